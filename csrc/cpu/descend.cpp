// descend (one level) and descend_tree (every level in one parallel region) on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <vector>

#include "../checks.h"
#include "descend_row.h"
#include "descend_shared.h"
#include "kernels.h"

namespace mllm::cpu {
namespace {

// Everything a level needs once its dtypes are known: the converted probes kept alive, and
// a type-erased row function.
struct PreparedLevel {
  at::Tensor probes;  // [B, P, D] in the compute dtype
  at::Tensor keys;    // contiguous
  at::Tensor mask;    // contiguous bool, or undefined
  at::Tensor scales;  // contiguous float32 [N] for int8 keys, or undefined
  at::Tensor ids;     // [B, t] output
  at::Tensor scores;  // [B, t] output
  int64_t t;
  // Selects the top t of query row b over the children of parents[0 .. num_parents) into
  // out_scores [t] (the compute dtype) and out_ids [t].
  std::function<void(int64_t b, const int64_t* parents, int64_t num_parents, int64_t fanout, bool skip_repeated,
                     void* out_scores, int64_t* out_ids)>
      run_row;
  // run into rows first_row .. first_row + num_rows of the outputs together, where row b's
  // parents are parents_of(b): keys scored exactly share the reads of parents that several rows
  // selected (descend_rows_shared); rows that the int8 screen takes (it skips most keys) go one
  // by one, unless they share their parents enough (kShareOverScreen).
  std::function<void(int64_t first_row, int64_t num_rows, const std::function<const int64_t*(int64_t)>& parents_of,
                     int64_t num_parents, int64_t fanout, bool skip_repeated)>
      run_rows;
  // Row b of the outputs = the top t of the num_parts rows of [num_parts, t] partial results.
  std::function<void(int64_t b, int64_t num_parts, const void* part_scores, const int64_t* part_ids)> merge_parts;

  // run_row into row b of the outputs.
  void run(int64_t b, const int64_t* parents, int64_t num_parents, int64_t fanout, bool skip_repeated) const {
    run_row(b, parents, num_parents, fanout, skip_repeated,
            static_cast<char*>(scores.data_ptr()) + b * t * scores.element_size(), ids.data_ptr<int64_t>() + b * t);
  }
};

// From how many rows per parent (rows_per_parent) rows of int8 keys go through the shared exact
// scoring (descend_rows_shared) instead of the int8 screen one row at a time. The screen reads and
// bounds a block again for every row that selected it; where many rows share a parent, reading it
// once for all of them is faster. Measured per level of the e2e trees (clustered data, 1e4 to 1e6
// leaves, B=16 and 64, t=8 and 32; the screen with one digit per probe element, before it got
// cheaper): at 4.3 to 32 rows per parent the shared path took 0.42x-0.91x of the screen's time;
// at 1.0-2.0 the screen was mostly faster (1.05x-1.52x, once 0.76x). On uniform random keys, where
// the screen rules out nearly every row, it took half the shared path's time at 2.3 rows per
// parent (8,192 keys, B=64, T=8, one probe and four; two builds run one after the other).
constexpr double kShareOverScreen = 4.0;

// The mean number of the rows first_row .. first_row + num_rows that selected each of their
// distinct parents (-1 parents, and with skip_repeated a parent repeated in a row, aside): 1 when
// no two rows share a parent.
double rows_per_parent(int64_t first_row, int64_t num_rows, const std::function<const int64_t*(int64_t)>& parents_of,
                       int64_t num_parents, bool skip_repeated) {
  thread_local std::vector<int64_t> ids;
  ids.clear();
  for (int64_t b = first_row; b < first_row + num_rows; ++b) {
    const int64_t* parents = parents_of(b);
    for (int64_t j = 0; j < num_parents; ++j)
      if (parents[j] >= 0 && !(skip_repeated && repeats_earlier(parents, j))) ids.push_back(parents[j]);
  }
  if (ids.empty()) return 1.0;
  std::sort(ids.begin(), ids.end());
  const auto distinct = std::unique(ids.begin(), ids.end()) - ids.begin();
  return static_cast<double>(ids.size()) / static_cast<double>(distinct);
}

PreparedLevel prepare_level(const at::Tensor& probes, const at::Tensor& keys, const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>& key_scales, int64_t t, bool lse) {
  PreparedLevel level;
  const at::ScalarType acc = compute_dtype(probes, keys);
  level.probes = probes.to(acc).contiguous();
  level.keys = keys.contiguous();
  if (mask.has_value()) level.mask = mask->contiguous();
  if (key_scales.has_value()) level.scales = key_scales->contiguous();
  level.t = t;
  const int64_t batch = probes.size(0);
  level.ids = empty_output({batch, t}, probes.options().dtype(at::kLong));
  level.scores = empty_output({batch, t}, probes.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kChar, keys.scalar_type(), "descend", [&] {
    using key_t = scalar_t;
    auto bind = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      LevelView<key_t, acc_t> view{level.probes.data_ptr<acc_t>(),
                                   level.keys.data_ptr<key_t>(),
                                   level.mask.defined() ? level.mask.data_ptr<bool>() : nullptr,
                                   level.scales.defined() ? level.scales.data_ptr<float>() : nullptr,
                                   level.probes.size(1),
                                   level.probes.size(2),
                                   level.keys.size(0),
                                   lse};
      acc_t* scores = level.scores.data_ptr<acc_t>();
      int64_t* ids = level.ids.data_ptr<int64_t>();
      level.run_row = [=](int64_t b, const int64_t* parents, int64_t num_parents, int64_t fanout, bool skip_repeated,
                          void* out_scores, int64_t* out_ids) {
        thread_local RowScratch<acc_t> scratch;
        descend_row(view, b, parents, num_parents, fanout, skip_repeated, t, static_cast<acc_t*>(out_scores), out_ids,
                    scratch);
      };
      level.run_rows = [=](int64_t first_row, int64_t num_rows, const std::function<const int64_t*(int64_t)>& parents_of,
                           int64_t num_parents, int64_t fanout, bool skip_repeated) {
        if (screens<key_t, acc_t>(num_parents * fanout, t) &&
            rows_per_parent(first_row, num_rows, parents_of, num_parents, skip_repeated) < kShareOverScreen) {
          thread_local RowScratch<acc_t> scratch;
          for (int64_t b = first_row; b < first_row + num_rows; ++b)
            descend_row(view, b, parents_of(b), num_parents, fanout, skip_repeated, t, scores + b * t, ids + b * t,
                        scratch);
        } else {
          thread_local SharedScratch<acc_t> scratch;
          descend_rows_shared(view, first_row, num_rows, parents_of, num_parents, fanout, skip_repeated, t, scores,
                              ids, scratch);
        }
      };
      // ranks_before is a total order, so the top t of the parts' top t is the one-pass result.
      level.merge_parts = [=](int64_t b, int64_t num_parts, const void* part_scores, const int64_t* part_ids) {
        const acc_t* part_score = static_cast<const acc_t*>(part_scores);
        RunningTopT<acc_t> top(scores + b * t, ids + b * t, t);
        for (int64_t i = 0; i < num_parts * t; ++i)
          if (part_ids[i] >= 0) top.push(part_score[i], part_ids[i]);
        top.finish();
      };
    };
    if (acc == at::kDouble) {
      bind(double(0));
    } else {
      bind(float(0));
    }
  });
  return level;
}

// Children scored per query row from which a row is worth splitting across the threads
// (child rows times dim): about 10 us of work, against a few us to start and join them.
constexpr int64_t kSplitMinElements = 1 << 17;

// Whether rows of a batch of `batch` queries are split across threads (see split_row): only when
// the batch leaves threads idle, and the row's work outweighs the cost of the split.
bool worth_splitting(int64_t batch, int64_t children, int64_t dim) {
  return batch < at::get_num_threads() && !at::in_parallel_region() && children * dim >= kSplitMinElements;
}

// Query row b of `level` with its parents split among the threads, for batches too small to
// keep every thread busy: each thread selects the top t of its share of the parents, then the
// shares are merged. With skip_repeated, repeated parents are dropped first (a parent in two
// shares would count its children twice).
void split_row(const PreparedLevel& level, int64_t b, const int64_t* parents, int64_t num_parents, int64_t fanout,
               bool skip_repeated) {
  std::vector<int64_t> unique;
  if (skip_repeated) {
    unique.reserve(num_parents);
    for (int64_t j = 0; j < num_parents; ++j)
      if (parents[j] >= 0 && std::find(unique.begin(), unique.end(), parents[j]) == unique.end())
        unique.push_back(parents[j]);
    parents = unique.data();
    num_parents = static_cast<int64_t>(unique.size());
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(num_parents, 1));
  const at::Tensor part_scores = at::empty({parts, level.t}, level.scores.options());
  const at::Tensor part_ids = at::empty({parts, level.t}, level.ids.options());
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t first = num_parents * part / parts, last = num_parents * (part + 1) / parts;
      char* scores_row = static_cast<char*>(part_scores.data_ptr()) + part * level.t * part_scores.element_size();
      level.run_row(b, parents + first, last - first, fanout, /*skip_repeated=*/false, scores_row,
                    part_ids.data_ptr<int64_t>() + part * level.t);
    }
  });
  level.merge_parts(b, parts, part_scores.data_ptr(), part_ids.data_ptr<int64_t>());
}

// Calls block_fn(first_row, num_rows) over blocks of rows covering [0, batch) on all the threads.
// A block is a thread's share of the batch, up to kMaxRowsPerBlock rows: its rows share the
// reads of the parents they have in common (descend_rows_shared), so larger blocks read less.
// Quarter shares were 1.04x-1.23x slower with float16 keys at B=16 and 64, one probe or four
// (descend_tree on the e2e trees of 1e4 to 1e6 leaves, descend on 8,192 keys in the L3), and no
// faster beyond the caches or with int8 keys (most of their rows go row by row, through the int8
// screen). Larger batches have more blocks than threads, handed out one at a time from a shared
// counter: a thread that finishes early (rows differ in work, and on a shared machine a thread may
// lose its core for a while) takes the next.
constexpr int64_t kMaxRowsPerBlock = 64;

template <typename BlockFn>
void parallel_row_blocks(int64_t batch, const BlockFn& block_fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), batch);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t first = 0; first < batch; first += kMaxRowsPerBlock)
      block_fn(first, std::min(kMaxRowsPerBlock, batch - first));
    return;
  }
  const int64_t rows = std::min(ceil_div(batch, threads), kMaxRowsPerBlock);
  std::atomic<int64_t> next_row{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t first = next_row.fetch_add(rows, std::memory_order_relaxed); first < batch;
         first = next_row.fetch_add(rows, std::memory_order_relaxed))
      block_fn(first, std::min(rows, batch - first));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> descend(const at::Tensor& probes, const at::Tensor& keys, const at::Tensor& parents,
                                           int64_t fanout, int64_t t, const std::string& reduce,
                                           const std::optional<at::Tensor>& mask,
                                           const std::optional<at::Tensor>& key_scales) {
  const char* op = "descend";
  check_level(op, probes, keys, mask, key_scales);
  check_at_least_one(op, "fanout", fanout);
  check_at_least_one(op, "t", t);
  const bool lse = parse_reduce(op, reduce);
  check_parents(op, parents, probes, keys.size(0), fanout);
  PreparedLevel level = prepare_level(probes, keys, mask, key_scales, t, lse);
  const at::Tensor parents_c = parents.contiguous();
  const int64_t* parent_ids = parents_c.data_ptr<int64_t>();
  const int64_t num_parents = parents_c.size(1);
  const int64_t batch = probes.size(0);
  if (worth_splitting(batch, num_parents * fanout, keys.size(1))) {
    for (int64_t b = 0; b < batch; ++b) split_row(level, b, parent_ids + b * num_parents, num_parents, fanout, true);
    return {level.ids, level.scores};
  }
  const std::function<const int64_t*(int64_t)> parents_of = [&](int64_t b) { return parent_ids + b * num_parents; };
  parallel_row_blocks(batch, [&](int64_t first_row, int64_t num_rows) {
    level.run_rows(first_row, num_rows, parents_of, num_parents, fanout, /*skip_repeated=*/true);
  });
  return {level.ids, level.scores};
}

std::vector<at::Tensor> descend_tree(const std::vector<at::Tensor>& probes, const std::vector<at::Tensor>& keys,
                                     int64_t fanout, const std::vector<int64_t>& t, const std::string& reduce,
                                     const std::vector<std::optional<at::Tensor>>& masks,
                                     const std::optional<std::vector<std::optional<at::Tensor>>>& key_scales) {
  const char* op = "descend_tree";
  const size_t num_levels = keys.size();
  TORCH_CHECK_VALUE(num_levels >= 1, op, ": keys must hold at least one level");
  TORCH_CHECK_VALUE(probes.size() == num_levels, op, ": probes has ", probes.size(), " levels but keys has ",
                    num_levels);
  TORCH_CHECK_VALUE(t.size() == num_levels, op, ": t has ", t.size(), " entries but there are ", num_levels,
                    " levels");
  TORCH_CHECK_VALUE(masks.size() == num_levels, op, ": masks has ", masks.size(), " entries but there are ",
                    num_levels, " levels");
  TORCH_CHECK_VALUE(!key_scales.has_value() || key_scales->size() == num_levels, op, ": key_scales has ",
                    key_scales.has_value() ? key_scales->size() : 0, " entries but there are ", num_levels,
                    " levels");
  check_at_least_one(op, "fanout", fanout);
  const bool lse = parse_reduce(op, reduce);
  const std::optional<at::Tensor> no_scales;
  auto scales_of = [&](size_t level) -> const std::optional<at::Tensor>& {
    return key_scales.has_value() ? (*key_scales)[level] : no_scales;
  };
  for (size_t level = 0; level < num_levels; ++level) {
    const std::string index = "[" + std::to_string(level) + "]";
    TORCH_CHECK_VALUE(t[level] >= 1, op, ": t", index, " must be >= 1, got ", t[level]);
    check_level(op, probes[level], keys[level], masks[level], scales_of(level), "probes" + index, "keys" + index,
                "masks" + index, "key_scales" + index);
    TORCH_CHECK_VALUE(probes[level].size(0) == probes[0].size(0), op, ": probes", index, " has B=",
                      probes[level].size(0), ", probes[0] has B=", probes[0].size(0));
    check_same_device(op, "keys[0]", keys[0], "keys" + index, keys[level]);
    if (level > 0) {
      const int64_t children = keys[level].size(0);
      const int64_t expected = ceil_div(children, fanout);
      TORCH_CHECK_VALUE(keys[level - 1].size(0) == expected, op, ": keys[", level - 1, "] has ",
                        keys[level - 1].size(0), " nodes but keys", index, " has ", children,
                        ", so it must have ceil(", children, " / ", fanout, ") = ", expected);
    }
  }
  std::vector<PreparedLevel> levels;
  levels.reserve(num_levels);
  for (size_t level = 0; level < num_levels; ++level)
    levels.push_back(prepare_level(probes[level], keys[level], masks[level], scales_of(level), t[level], lse));

  // The top level is the children of one virtual root that owns all its nodes, each lower level
  // the children of the selection above. With enough queries, one parallel region in which
  // each query walks every level.
  const int64_t top_nodes = std::max<int64_t>(keys[0].size(0), 1);
  const int64_t root = 0;
  const int64_t batch = probes[0].size(0);
  // Row b of level `level`: the children of the row's selection one level up (or of the root).
  auto parents_of = [&](size_t level, int64_t b) -> const int64_t* {
    return level == 0 ? &root : levels[level - 1].ids.data_ptr<int64_t>() + b * levels[level - 1].t;
  };
  auto fanout_of = [&](size_t level) { return level == 0 ? top_nodes : fanout; };
  auto parents_count = [&](size_t level) { return level == 0 ? int64_t(1) : levels[level - 1].t; };
  if (batch < at::get_num_threads()) {
    // Too few queries for the threads: level by level, each row's children split among them
    // where that pays, else one row per thread.
    for (size_t level = 0; level < num_levels; ++level) {
      if (level > 0 && worth_splitting(batch, parents_count(level) * fanout, keys[level].size(1))) {
        for (int64_t b = 0; b < batch; ++b)
          split_row(levels[level], b, parents_of(level, b), parents_count(level), fanout, false);
        continue;
      }
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          levels[level].run(b, parents_of(level, b), parents_count(level), fanout_of(level), false);
      });
    }
  } else {
    parallel_row_blocks(batch, [&](int64_t first_row, int64_t num_rows) {
      for (size_t level = 0; level < num_levels; ++level) {
        const std::function<const int64_t*(int64_t)> level_parents = [&](int64_t b) { return parents_of(level, b); };
        levels[level].run_rows(first_row, num_rows, level_parents, parents_count(level), fanout_of(level), false);
      }
    });
  }
  std::vector<at::Tensor> out;
  for (const PreparedLevel& level : levels) {
    out.push_back(level.ids);
    out.push_back(level.scores);
  }
  return out;
}

}  // namespace mllm::cpu
