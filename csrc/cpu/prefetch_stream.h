// Software prefetch of key rows; the key blocks of a descent as one prefetched stream (BlockPrefetcher:
// one block after the other; for_each_chunk: a few blocks at a time, read in turn).
#pragma once

#include <algorithm>
#include <cstdint>

namespace mllm::cpu {

// Prefetches the line at `p` into the L2 (and the L3). On x86 as an asm statement: GCC deleted
// whole loops of __builtin_prefetch (a loop with no other effect), so that some of the streams
// below silently lost their first kPrefetchBytes.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(_M_X64)
  asm volatile("prefetcht1 %0" : : "m"(*p));
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

// The children [first, last) of one parent.
struct ChildRange {
  int64_t first, last;
};

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

// Calls on_chunk(block, first, count) for the children of `blocks` ([first, first + count) of
// blocks[block], count <= chunk) in ChunkOrder, with the key rows prefetched (into the L2)
// kPrefetchBytes ahead in the same order; on_prefetch(first, count) may prefetch what else those
// children need (int8 scales). keys: the level's rows, `row_bytes` each.
template <typename OnChunk, typename OnPrefetch>
inline void for_each_chunk(const void* keys, int64_t row_bytes, const ChildRange* blocks, int64_t num_blocks,
                           int64_t chunk, OnChunk&& on_chunk, OnPrefetch&& on_prefetch) {
  const char* base = static_cast<const char*>(keys);
  const int64_t lead_rows = std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(row_bytes, 1));
  ChunkOrder order(blocks, num_blocks, chunk), ahead(blocks, num_blocks, chunk);
  int64_t consumed = 0, prefetched = 0, block, first, count;
  while (order.next(block, first, count)) {
    consumed += count;
    int64_t ahead_block, ahead_first, ahead_count;
    while (prefetched < consumed + lead_rows && ahead.next(ahead_block, ahead_first, ahead_count)) {
      prefetch_row(base + ahead_first * row_bytes, ahead_count * row_bytes);
      on_prefetch(ahead_first, ahead_count);
      prefetched += ahead_count;
    }
    on_chunk(block, first, count);
  }
}

// for_each_chunk with nothing else to prefetch.
template <typename OnChunk>
inline void for_each_chunk(const void* keys, int64_t row_bytes, const ChildRange* blocks, int64_t num_blocks,
                           int64_t chunk, OnChunk&& on_chunk) {
  for_each_chunk(keys, row_bytes, blocks, num_blocks, chunk, on_chunk, [](int64_t, int64_t) {});
}

}  // namespace mllm::cpu
