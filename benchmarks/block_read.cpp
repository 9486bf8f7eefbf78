// The read of a descent's key blocks with no scoring: the bytes descend reads (for each query
// row, the children blocks of its parents), in the same order (for_each_chunk: a few blocks at a
// time, a chunk of rows of each in turn) with the same software prefetch stream
// (csrc/cpu/prefetch_stream.h; each chunk's prefetch issued at once, where the kernels spread it
// over their scoring) and the same number of threads, folded into one checksum per row
// with 32-byte loads. The op benchmarks time it beside descend: the bandwidth that this
// access pattern (random blocks of fanout rows) gets on the machine, as opposed to a sequential
// read. Built and loaded by block_read.py (plain C ABI, ctypes).
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "prefetch_stream.h"

namespace {
using Lanes = uint64_t __attribute__((vector_size(32)));

// acc ^= each 32-byte word of [p, p + bytes); bytes is a multiple of 32. (By reference: a 32-byte
// vector passed by value has a different ABI with and without AVX, which g++ warns about.)
inline void fold(const char* p, int64_t bytes, Lanes& acc) {
  for (int64_t off = 0; off < bytes; off += 32) {
    Lanes word;
    std::memcpy(&word, p + off, sizeof(word));
    acc ^= word;
  }
}
}  // namespace

// keys: [num_nodes, row_bytes] bytes (row_bytes a multiple of 32); parents: [rows, num_parents]
// (-1 empty); chunk: the rows read from one block in turn (the kernel's: 6 rows, 8 for int8);
// out: [rows] checksums (XOR of every 8-byte word the row read, the words of one 32-byte load
// folded in lane order).
extern "C" void read_blocks(const char* keys, int64_t row_bytes, int64_t num_nodes, const int64_t* parents,
                            int64_t rows, int64_t num_parents, int64_t fanout, int64_t chunk, int threads,
                            uint64_t* out) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<mllm::cpu::ChildRange> blocks;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t* row_parents = parents + b * num_parents;
      blocks.clear();
      for (int64_t j = 0; j < num_parents; ++j) {
        if (row_parents[j] < 0) continue;
        blocks.push_back(mllm::cpu::children_of(row_parents[j], fanout, num_nodes));
      }
      Lanes acc = {0, 0, 0, 0};
      mllm::cpu::for_each_chunk(keys, row_bytes, blocks.data(), static_cast<int64_t>(blocks.size()), chunk,
                                [&](int64_t, int64_t first, int64_t count) {
                                  fold(keys + first * row_bytes, count * row_bytes, acc);
                                });
      out[b] = acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
    }
  }
}
