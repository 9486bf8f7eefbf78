// Software prefetch of key rows, and the walk over a descent's key blocks (a few blocks at a time,
// read in turn) with one prefetch stream in the same order.
#pragma once

#include <algorithm>
#include <cstdint>

namespace mllm::cpu {

// Prefetches the line at `p` into the L2 (and the L3). On x86 as an asm statement: GCC deleted
// whole loops of __builtin_prefetch (a loop with no other effect) in some of their copies, and
// the first kPrefetchBytes of each of the descent's prefetch streams went unprefetched. The
// address goes in a register: as a memory operand ("m"), GCC stored dot_tile's accumulators to
// the stack before every prefetch in its loop.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(_M_X64)
  asm volatile("prefetcht1 (%0)" : : "r"(p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Prefetches the row at `p` (`bytes` long) into the L2 (and the L3).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) prefetch_line(c + off);
}

// How far ahead of the row being scored the key stream is prefetched. On the 2-core AMD EPYC
// (Zen 4, AVX2) of the benchmarks, a level far larger than the caches (B=64, one probe, random
// parents) reads at about the same speed 6 and 12 KiB ahead, 1.5x slower 3 KiB ahead, and 2.3x
// slower without software prefetch: the hardware prefetchers do not follow random blocks. On a
// 2-core Intel Xeon (AVX-512), 16 and 32 KiB are within the noise of 8 KiB, and no lead (each row
// prefetched as it is read) is 0.64x-0.97x as fast.
constexpr int64_t kPrefetchBytes = 8192;

// The children [first, last) of one parent.
struct ChildRange {
  int64_t first, last;
};

// The children of `parent` (>= 0) in a level of `num_nodes` rows, `fanout` per parent: the last
// parent's block may be short.
inline ChildRange children_of(int64_t parent, int64_t fanout, int64_t num_nodes) {
  const int64_t first = parent * fanout;
  return {first, std::min(first + fanout, num_nodes)};
}

// How many blocks for_each_chunk reads at once. Reading several blocks in turn gives the core's
// hardware prefetchers several streams to follow while the keys are scored. On a 2-core Intel
// Xeon (AVX-512), descend on a level far larger than the caches (B=64, T=8, fanout 64, D=384)
// with four blocks in turn against one after the other, in alternating rounds in one process:
// float16 1.14x with one probe, 1.02x with four; int8 1.09x and 1.08x; a whole descend_tree of
// 1e6 leaves 0.99x-1.02x.
constexpr int64_t kInterleavedBlocks = 4;

// The order in which for_each_chunk visits the children of a list of blocks: kInterleavedBlocks
// blocks at a time, `chunk` children of each in turn until all of them are done, then the next
// blocks.
class ChunkOrder {
 public:
  ChunkOrder(const ChildRange* blocks, int64_t num_blocks, int64_t chunk)
      : blocks_(blocks), num_blocks_(num_blocks), chunk_(chunk) {
    start_group(0);
  }

  // The next chunk: the children [first, first + count) of blocks[block]; false after the last.
  bool next(int64_t& block, int64_t& first, int64_t& count) {
    while (group_ < num_blocks_) {
      for (; slot_ < group_end_; ++slot_) {
        const int64_t begin = blocks_[slot_].first + offset_;
        if (begin < blocks_[slot_].last) {
          block = slot_++;
          first = begin;
          count = std::min(chunk_, blocks_[block].last - begin);
          return true;
        }
      }
      offset_ += chunk_;
      slot_ = group_;
      if (offset_ >= longest_) start_group(group_end_);
    }
    return false;
  }

 private:
  void start_group(int64_t group) {
    group_ = slot_ = group;
    group_end_ = std::min(group + kInterleavedBlocks, num_blocks_);
    offset_ = longest_ = 0;
    for (int64_t b = group; b < group_end_; ++b) longest_ = std::max(longest_, blocks_[b].last - blocks_[b].first);
  }

  const ChildRange* blocks_;
  int64_t num_blocks_, chunk_;
  int64_t group_ = 0, group_end_ = 0;  // the blocks [group_, group_end_) are read in turn
  int64_t slot_ = 0;                   // the next of them to give a chunk
  int64_t offset_ = 0, longest_ = 0;   // the chunks' offset in their block; the longest block
};

// The prefetch of a chunk's key rows, spread over the scoring of the chunk before it: the scoring
// loops (dot_tile, the int8 screen) issue a line or a few per step instead of the whole chunk at
// once before it. Issued at once, the lines of a chunk (72 for six float16 rows of 384) seem to
// hold up the scoring behind them (probably queued for the core's few line-fill buffers, which
// the scoring's own loads from the L2 need too): the key reads and the scoring took turns, a
// level beyond the caches taking about the time of its read plus that of its scoring from the L2.
// On a 2-core Intel Xeon (AVX-512), float16 keys, B=64, T=8, fanout 64, D=384, 2M keys (1.5 GB),
// in alternating rounds in one process: descend 1.18x faster with one probe, 1.22x with four,
// score_children 1.26x, int8 keys (the screen) 1.15x and 1.14x; keys in the L2 0.95x-1.03x.
// One line per step of dot_tile (a third to two thirds of what the step reads, with one probe and
// four) beat two or three; the screen takes four per step (half of what it reads).
struct PrefetchSpread {
  const char* next = nullptr;  // the next line to prefetch
  const char* end = nullptr;   // past the last

  // Prefetches the rest at once.
  void finish() {
    if (next < end) prefetch_row(next, end - next);
    next = end;
  }
};

// Up to `lines` lines of a PrefetchSpread's range [next, end) prefetched; returns the new next.
// The scoring loops keep next and end in locals, in registers, rather than in the struct.
inline const char* prefetch_lines(const char* next, const char* end, int lines) {
  for (int j = 0; j < lines && next < end; ++j, next += 64) prefetch_line(next);
  return next;
}

// Calls on_chunk(block, first, count) for the children of `blocks` ([first, first + count) of
// blocks[block], count <= chunk) in ChunkOrder, with the key rows prefetched (into the L2)
// kPrefetchBytes ahead in the same order; on_prefetch(first, count) may prefetch what else those
// children need (int8 scales). keys: the level's rows, `row_bytes` each. With `spread`, the
// prefetch of the chunk that enters the lead as on_chunk is called is left in *spread for
// on_chunk's scoring to issue a line at a time (what it leaves is issued before the next chunk's).
template <typename OnChunk, typename OnPrefetch>
inline void for_each_chunk(const void* keys, int64_t row_bytes, const ChildRange* blocks, int64_t num_blocks,
                           int64_t chunk, OnChunk&& on_chunk, OnPrefetch&& on_prefetch,
                           PrefetchSpread* spread = nullptr) {
  const char* base = static_cast<const char*>(keys);
  const int64_t lead_rows = std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(row_bytes, 1));
  ChunkOrder order(blocks, num_blocks, chunk), ahead(blocks, num_blocks, chunk);
  int64_t consumed = 0, prefetched = 0, block, first, count;
  while (order.next(block, first, count)) {
    consumed += count;
    int64_t ahead_block, ahead_first, ahead_count;
    while (prefetched < consumed + lead_rows && ahead.next(ahead_block, ahead_first, ahead_count)) {
      const char* rows = base + ahead_first * row_bytes;
      if (spread != nullptr) {
        spread->finish();
        *spread = {rows, rows + ahead_count * row_bytes};
      } else {
        prefetch_row(rows, ahead_count * row_bytes);
      }
      on_prefetch(ahead_first, ahead_count);
      prefetched += ahead_count;
    }
    on_chunk(block, first, count);
  }
  if (spread != nullptr) spread->finish();
}

// for_each_chunk with nothing else to prefetch.
template <typename OnChunk>
inline void for_each_chunk(const void* keys, int64_t row_bytes, const ChildRange* blocks, int64_t num_blocks,
                           int64_t chunk, OnChunk&& on_chunk, PrefetchSpread* spread = nullptr) {
  for_each_chunk(keys, row_bytes, blocks, num_blocks, chunk, on_chunk, [](int64_t, int64_t) {}, spread);
}

}  // namespace mllm::cpu
