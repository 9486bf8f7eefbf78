// Software prefetch of key rows, and of the key blocks that one query row reads as a single stream.
#pragma once

#include <algorithm>
#include <cstdint>

namespace mllm::cpu {

// Prefetches the row at `p` (`bytes` long) into the L2 (and the L3).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// How far ahead of the row being scored the key stream is prefetched. On the 2-core AMD EPYC
// (Zen 4, AVX2) of the benchmarks, a level far larger than the caches (B=64, one probe, random
// parents) reads at about the same speed 6 and 12 KiB ahead, 1.5x slower 3 KiB ahead, and 2.3x
// slower without software prefetch: the hardware prefetchers do not follow random blocks.
constexpr int64_t kPrefetchBytes = 8192;

// Prefetches (into the L2) the key blocks of a list of parents in order, `kPrefetchBytes`
// ahead of the consumer and across block boundaries: the next block's first rows are in flight
// when a block ends, without a burst of prefetches at each block start (a burst fills the
// core's miss buffers and stalls it). -1 parents are skipped; the last block may be short.
class BlockPrefetcher {
 public:
  // base: the level's keys; block_bytes: the bytes of one parent's children (fanout rows);
  // level_bytes: the bytes of the whole level.
  BlockPrefetcher(const void* base, int64_t block_bytes, int64_t level_bytes, const int64_t* parents,
                  int64_t num_parents)
      : base_(static_cast<const char*>(base)),
        block_bytes_(block_bytes),
        level_bytes_(level_bytes),
        parents_(parents),
        num_parents_(num_parents) {
    advance(kPrefetchBytes);
  }

  // Moves the stream on by `bytes` (call once per row scored, or skipped, with the row's size).
  void advance(int64_t bytes) {
    while (bytes > 0) {
      if (pos_ >= end_ && !next_block()) return;
      const int64_t step = std::min(bytes, end_ - pos_);
      prefetch_row(base_ + pos_, step);
      pos_ += step;
      bytes -= step;
    }
  }

 private:
  bool next_block() {
    while (next_ < num_parents_) {
      const int64_t parent = parents_[next_++];
      if (parent < 0) continue;
      pos_ = parent * block_bytes_;
      end_ = std::min(pos_ + block_bytes_, level_bytes_);
      if (pos_ < end_) return true;
    }
    return false;
  }

  const char* base_;
  int64_t block_bytes_, level_bytes_;
  const int64_t* parents_;
  int64_t num_parents_;
  int64_t next_ = 0;     // the next entry of parents_ to stream
  int64_t pos_ = 0;      // byte offset of the next line to prefetch
  int64_t end_ = 0;      // end of the current block
};

}  // namespace mllm::cpu
