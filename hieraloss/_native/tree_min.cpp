// Compiled CPU kernel of the tree-min loss (see tree_min_kernel.h for the math), called through
// ctypes with raw pointers, so any framework (torch, paddle, numpy) can use it. Built as an optional
// extension module by setup.py; hieraloss falls back to its vectorized framework ops without it.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define HIERALOSS_PREFETCH(address, for_write) __builtin_prefetch((address), (for_write), 3)
#else
#define HIERALOSS_PREFETCH(address, for_write) ((void)0)
#endif

#define HIERALOSS_ISA generic
#include "tree_min_kernel.h"
#include "logicseg_kernel.h"
#undef HIERALOSS_ISA

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HIERALOSS_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define HIERALOSS_ISA avx2
#include "tree_min_kernel.h"
#include "logicseg_kernel.h"
#undef HIERALOSS_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define HIERALOSS_ISA avx512
#include "tree_min_kernel.h"
#include "logicseg_kernel.h"
#undef HIERALOSS_ISA
#pragma GCC pop_options
#endif

#if defined(_WIN32)
#define HIERALOSS_EXPORT __declspec(dllexport)
#else
#define HIERALOSS_EXPORT __attribute__((visibility("default")))
#endif

namespace {

// The widest instruction set compiled in and supported by this CPU: 2 = AVX-512, 1 = AVX2 + FMA, 0 = baseline.
int best_isa_level() {
#ifdef HIERALOSS_HAVE_AVX2
  static const int level = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
                               ? 2
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1
                                                                                                : 0;
  return level;
#else
  return 0;
#endif
}

std::atomic<int> isa_cap{2};  // lowered by hieraloss_set_isa (tests run every compiled variant)

int isa_level() { return std::min(best_isa_level(), isa_cap.load()); }

// The cross-entropy classes per depth (null tables when no CE output is asked for).
struct Classes {
  int64_t num_depths;
  const int32_t* offsets;
  const int32_t* channels;
  const int32_t* ce_target;
};

template <typename T>
int launch(const T* x, int64_t B, int64_t N, int64_t P, const int64_t* lc, const int32_t* edges, int64_t num_edges,
           const int32_t* pre, const int32_t* size, double gamma, double* channel_sums, T* loss_map,
           const double* map_scale, T* grad, const double* grad_scale, const T* grad_up, const Classes& cls,
           double* ce_sums, const double* ce_grad_scale, int64_t tile, int64_t num_threads) {
  if (B < 0 || N < 1 || P < 0 || tile < 1 || num_edges < 0 || num_edges >= N) return 1;
  const int which = (channel_sums ? 8 : 0) | (loss_map ? 4 : 0) | (grad ? 2 : 0) | (grad_up ? 1 : 0) |
                    (ce_sums ? 16 : 0) | (ce_grad_scale ? 32 : 0);
  if (!supported_outputs(which)) return 3;
  const bool with_ce = ce_sums || ce_grad_scale;
  int64_t max_classes = 0;
  if (with_ce) {  // the class tables: offsets from 0, non-empty depths, channels and targets in range
    const int64_t L = cls.num_depths;
    if (L < 1 || !cls.offsets || !cls.channels || !cls.ce_target || cls.offsets[0] != 0) return 1;
    for (int64_t d = 0; d < L; ++d) {
      const int64_t k = static_cast<int64_t>(cls.offsets[d + 1]) - cls.offsets[d];
      if (k < 1) return 1;
      max_classes = std::max(max_classes, k);
    }
    for (int64_t j = 0; j < cls.offsets[L]; ++j)
      if (cls.channels[j] < 0 || cls.channels[j] >= N) return 1;
    for (int64_t j = 0; j < N * L; ++j)
      if (cls.ce_target[j] < -1 || cls.ce_target[j] >= N) return 1;
  }
  const int64_t L = with_ce ? cls.num_depths : 0;
  if (channel_sums) std::fill(channel_sums, channel_sums + N, 0.0);
  if (ce_sums) std::fill(ce_sums, ce_sums + L, 0.0);
  const int64_t tiles_per_image = (P + tile - 1) / tile;
  const int64_t items = B * tiles_per_image;
  if (items == 0) return 0;
  const int64_t threads = std::max<int64_t>(1, std::min(num_threads, items));
  std::vector<double> sums(channel_sums ? threads * N : 0, 0.0);
  std::vector<double> ce_thread_sums(ce_sums ? threads * L : 0, 0.0);
  std::vector<uint8_t> is_child(N, 0);
  for (int64_t e = 0; e < num_edges; ++e) {
    const int32_t kid = edges[2 * e], par = edges[2 * e + 1];
    if (kid < 0 || kid >= N || par < 0 || par >= N) return 1;
    is_child[kid] = 1;
  }
  std::atomic<bool> failed{false};
  auto work = [&](int64_t id) {
    try {
      const int64_t first = items * id / threads, last = items * (id + 1) / threads;
      double* mine = channel_sums ? sums.data() + id * N : nullptr;
      double* ce_mine = ce_sums ? ce_thread_sums.data() + id * L : nullptr;
      const Tree t{N, edges, num_edges, pre, size, is_child.data(), L, cls.offsets, cls.channels, cls.ce_target,
                   max_classes};
      const Outputs<T> out{mine, loss_map, map_scale, grad, grad_scale, grad_up, ce_mine, ce_grad_scale};
#ifdef HIERALOSS_HAVE_AVX2
      if (isa_level() == 2) return avx512::run<T>(x, lc, P, tile, tiles_per_image, first, last, t, gamma, out);
      if (isa_level() == 1) return avx2::run<T>(x, lc, P, tile, tiles_per_image, first, last, t, gamma, out);
#endif
      generic::run<T>(x, lc, P, tile, tiles_per_image, first, last, t, gamma, out);
    } catch (...) {  // an exception must not leave a thread (std::terminate)
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t id = 1; id < threads; ++id) pool.emplace_back(work, id);
  } catch (...) {
    failed = true;  // could not start a thread: finish the started ones, then report
  }
  if (!failed) work(0);
  for (auto& th : pool) th.join();
  if (failed) return 4;
  for (int64_t id = 0; id < threads; ++id) {  // fixed order: the result does not depend on scheduling
    if (channel_sums)
      for (int64_t v = 0; v < N; ++v) channel_sums[v] += sums[id * N + v];
    if (ce_sums)
      for (int64_t d = 0; d < L; ++d) ce_sums[d] += ce_thread_sums[id * L + d];
  }
  return 0;
}

int dispatch_dtype(int dtype, const void* x, void* loss_map, void* grad, const void* grad_up, int64_t B, int64_t N,
                   int64_t P, const int64_t* lc, const int32_t* edges, int64_t num_edges, const int32_t* pre,
                   const int32_t* size, double gamma, double* channel_sums, const double* map_scale,
                   const double* grad_scale, const Classes& cls, double* ce_sums, const double* ce_grad_scale,
                   int64_t tile, int64_t num_threads) {
  if (dtype == 0)
    return launch<float>(static_cast<const float*>(x), B, N, P, lc, edges, num_edges, pre, size, gamma, channel_sums,
                         static_cast<float*>(loss_map), map_scale, static_cast<float*>(grad), grad_scale,
                         static_cast<const float*>(grad_up), cls, ce_sums, ce_grad_scale, tile, num_threads);
  if (dtype == 1)
    return launch<double>(static_cast<const double*>(x), B, N, P, lc, edges, num_edges, pre, size, gamma,
                          channel_sums, static_cast<double*>(loss_map), map_scale, static_cast<double*>(grad),
                          grad_scale, static_cast<const double*>(grad_up), cls, ce_sums, ce_grad_scale, tile,
                          num_threads);
  return 2;
}

// LogicSeg: stats (rule_sums non-null: per-clause sums) or apply (ASL sum and/or the gradient).
template <typename T>
int logic_launch(const T* x, int64_t B, int64_t N, int64_t P, const int64_t* lc, const LogicTables* lt,
                 double* rule_sums, const double* slopes, const AslOptions* asl, double* asl_sum, T* grad,
                 int64_t tile, int64_t num_threads) {
  if (B < 0 || N < 1 || P < 0 || tile < 1) return 1;
  const bool stats = rule_sums != nullptr;
  if (stats ? (lt == nullptr || asl != nullptr || grad != nullptr) : (asl == nullptr && grad == nullptr)) return 3;
  if (!stats && asl != nullptr && (asl_sum == nullptr || lc == nullptr)) return 3;
  if (slopes != nullptr && (lt == nullptr || grad == nullptr)) return 3;
  if (lt != nullptr) {  // indices in range, groups well formed
    auto bad = [N](int32_t c) { return c < 0 || c >= N; };
    for (int64_t e = 0; e < lt->num_edges; ++e)
      if (bad(lt->edge_child[e]) || bad(lt->edge_parent[e])) return 1;
    for (int64_t i = 0; i < lt->num_internal; ++i) {
      if (bad(lt->internal[i])) return 1;
      for (int64_t r = 0; r < lt->num_ranks; ++r)
        if (bad(lt->child_ranks[r * lt->num_internal + i])) return 1;
    }
    if (lt->num_internal > 0 && lt->num_ranks < 1) return 1;
    int64_t pairs = 0;
    if (lt->num_groups > 0 && lt->group_offsets[0] != 0) return 1;
    for (int64_t g = 0; g < lt->num_groups; ++g) {
      const int64_t n = static_cast<int64_t>(lt->group_offsets[g + 1]) - lt->group_offsets[g];
      if (n < 2) return 1;
      pairs += n * (n - 1) / 2;
      for (int64_t k = 0; k < n; ++k)
        if (bad(lt->group_members[lt->group_offsets[g] + k])) return 1;
    }
    if (pairs != lt->num_pairs || !(lt->p >= 1.0)) return 1;
  }
  if (asl != nullptr)
    for (int64_t v = 0; v < N; ++v)
      if (asl->pre[v] < 0 || asl->pre[v] >= N || asl->size[v] < 1) return 1;
  const int64_t clauses = stats ? lt->num_edges + lt->num_internal + lt->num_pairs + lt->num_groups : 1;
  if (rule_sums) std::fill(rule_sums, rule_sums + clauses, 0.0);
  if (asl_sum) *asl_sum = 0.0;
  const int64_t tiles_per_image = (P + tile - 1) / tile;
  const int64_t items = B * tiles_per_image;
  if (items == 0) return 0;
  const int64_t threads = std::max<int64_t>(1, std::min(num_threads, items));
  std::vector<double> sums(threads * clauses, 0.0);
  std::atomic<bool> failed{false};
  auto work = [&](int64_t id) {
    try {
      const int64_t first = items * id / threads, last = items * (id + 1) / threads;
      double* mine = sums.data() + id * clauses;
#ifdef HIERALOSS_HAVE_AVX2
      if (isa_level() == 2)
        return avx512::logic_run<T>(x, lc, N, P, tile, tiles_per_image, first, last, lt, stats, slopes, asl, grad,
                                    mine, clauses);
      if (isa_level() == 1)
        return avx2::logic_run<T>(x, lc, N, P, tile, tiles_per_image, first, last, lt, stats, slopes, asl, grad,
                                  mine, clauses);
#endif
      generic::logic_run<T>(x, lc, N, P, tile, tiles_per_image, first, last, lt, stats, slopes, asl, grad, mine,
                            clauses);
    } catch (...) {
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t id = 1; id < threads; ++id) pool.emplace_back(work, id);
  } catch (...) {
    failed = true;
  }
  if (!failed) work(0);
  for (auto& th : pool) th.join();
  if (failed) return 4;
  double* out = stats ? rule_sums : asl_sum;
  if (out != nullptr)
    for (int64_t id = 0; id < threads; ++id)  // fixed order: the result does not depend on scheduling
      for (int64_t c = 0; c < clauses; ++c) out[c] += sums[id * clauses + c];
  return 0;
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = float64 (x, loss_map, grad and grad_up all in that dtype).
// Outputs are optional (null to skip): channel_sums [N] (double, per-channel sums of the unscaled
// loss), loss_map [B, N, P] (times map_scale[v]), grad [B, N, P] (d sum_v scale_v * l_v / d x, with
// grad_scale[v] and the optional per-entry grad_up). Supported output sets: sums, sums + grad, map,
// grad, grad + grad_up. Returns 0, or 1 on bad sizes, 2 on a bad dtype, 3 on an unsupported set.
HIERALOSS_EXPORT int hieraloss_tree_min(int dtype, const void* x, int64_t B, int64_t N, int64_t P, const int64_t* lc,
                       const int32_t* edges, int64_t num_edges, const int32_t* pre, const int32_t* size,
                       double gamma, double* channel_sums, void* loss_map, const double* map_scale, void* grad,
                       const double* grad_scale, const void* grad_up, int64_t tile, int64_t num_threads) {
  try {
    const Classes none{0, nullptr, nullptr, nullptr};
    return dispatch_dtype(dtype, x, loss_map, grad, grad_up, B, N, P, lc, edges, num_edges, pre, size, gamma,
                          channel_sums, map_scale, grad_scale, none, nullptr, nullptr, tile, num_threads);
  } catch (...) {  // std::bad_alloc, std::system_error (threads): never unwind into C callers
    return 4;
  }
}

// hieraloss_tree_min plus, in the same pass over the logits, the cross-entropy of every depth (the
// HSSN objective). Classes: num_depths L, class_offsets [L + 1] and class_channels (depth d's classes
// are class_channels[class_offsets[d-1] .. class_offsets[d]): the nodes at depth d and the leaves
// shallower than d), ce_target [N, L] (the target class of a pixel labelled c at depth d, i.e.
// ancestor_table[c, d-1], or -1 where it does not count: a partial label coarser than d).
// Outputs: ce_sums [L] (double, per-depth sums of -log softmax(target) over the counted pixels) and
// ce_grad_scale [L] (grad gets sum_d ce_grad_scale[d] * d ce_sum_d / d x added); null = off (then
// this is hieraloss_tree_min). Supported sets with the cross-entropy: sums + ce_sums, sums + grad +
// ce_sums + ce_grad_scale, grad + ce_grad_scale. Same return codes.
HIERALOSS_EXPORT int hieraloss_tree_min_ce(int dtype, const void* x, int64_t B, int64_t N, int64_t P,
                          const int64_t* lc, const int32_t* edges, int64_t num_edges, const int32_t* pre,
                          const int32_t* size, double gamma, double* channel_sums, void* loss_map,
                          const double* map_scale, void* grad, const double* grad_scale, const void* grad_up,
                          int64_t num_depths, const int32_t* class_offsets, const int32_t* class_channels,
                          const int32_t* ce_target, double* ce_sums, const double* ce_grad_scale, int64_t tile,
                          int64_t num_threads) {
  try {
    const Classes cls{num_depths, class_offsets, class_channels, ce_target};
    return dispatch_dtype(dtype, x, loss_map, grad, grad_up, B, N, P, lc, edges, num_edges, pre, size, gamma,
                          channel_sums, map_scale, grad_scale, cls, ce_sums, ce_grad_scale, tile, num_threads);
  } catch (...) {
    return 4;
  }
}

// LogicSeg's objective (logicseg_kernel.h). Rules: num_edges, edge_child, edge_parent,
// num_internal, internal, num_ranks, child_ranks [num_ranks, num_internal], num_groups,
// group_offsets [G + 1], group_members, num_pairs, easy_filter, p (edge_child null: no rules).
// ASL: pre, size (null: no ASL), gamma_neg, gamma_pos, clip, eps, asl_scale; lc [B, P].
// Either stats (rule_sums [E + I + pairs + G] non-null: per-clause sums of viol^p, then the groups'
// hard-pixel counts) or apply: asl_sum (the ASL's sum over its counted entries) and/or grad
// ([B, N, P]: asl_scale times the ASL's gradient plus the rules' gradient from rule_slopes
// [E + I + pairs], d objective / d sum times p). Same return codes as hieraloss_tree_min.
HIERALOSS_EXPORT int hieraloss_logicseg(int dtype, const void* x, int64_t B, int64_t N, int64_t P, const int64_t* lc,
                                        int64_t num_edges, const int32_t* edge_child, const int32_t* edge_parent,
                                        int64_t num_internal, const int32_t* internal, int64_t num_ranks,
                                        const int32_t* child_ranks, int64_t num_groups, const int32_t* group_offsets,
                                        const int32_t* group_members, int64_t num_pairs, int easy_filter, double p,
                                        const int32_t* pre, const int32_t* size, double gamma_neg, double gamma_pos,
                                        double clip, double eps, double asl_scale, double* rule_sums,
                                        const double* rule_slopes, double* asl_sum, void* grad, int64_t tile,
                                        int64_t num_threads) {
  try {
    const LogicTables tables{num_edges, edge_child,    edge_parent,   num_internal, internal,    num_ranks,
                             child_ranks, num_groups, group_offsets, group_members, num_pairs, easy_filter, p};
    const LogicTables* lt = edge_child != nullptr ? &tables : nullptr;
    const AslOptions options{pre, size, gamma_neg, gamma_pos, clip, eps, asl_scale, 0};
    const AslOptions* asl = pre != nullptr ? &options : nullptr;
    if (dtype == 0)
      return logic_launch<float>(static_cast<const float*>(x), B, N, P, lc, lt, rule_sums, rule_slopes, asl, asl_sum,
                                 static_cast<float*>(grad), tile, num_threads);
    if (dtype == 1)
      return logic_launch<double>(static_cast<const double*>(x), B, N, P, lc, lt, rule_sums, rule_slopes, asl,
                                  asl_sum, static_cast<double*>(grad), tile, num_threads);
    return 2;
  } catch (...) {
    return 4;
  }
}

// Cap the instruction set (0 baseline, 1 AVX2, 2 AVX-512); returns the level now in use.
HIERALOSS_EXPORT int hieraloss_set_isa(int level) {
  isa_cap.store(std::max(0, std::min(2, level)));
  return isa_level();
}

// Ask the kernel for transparent huge pages on a fresh, untouched output buffer: its first touch
// then faults 2 MiB at a time instead of 4 KiB (a large share of one pass over a new gradient).
// Only whole huge pages inside [ptr, ptr + bytes) are advised. Returns 1 if advised, else 0.
HIERALOSS_EXPORT int hieraloss_advise_hugepages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(huge - 1);
  if (bytes <= 0 || end <= start) return 0;
  return madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE) == 0 ? 1 : 0;
#else
  (void)ptr;
  (void)bytes;
  return 0;
#endif
}

// Which instruction set the kernel runs with on this machine: "avx512", "avx2" or "generic".
HIERALOSS_EXPORT const char* hieraloss_isa() {
  static const char* names[] = {"generic", "avx2", "avx512"};
  return names[isa_level()];
}

}  // extern "C"

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_tree_min",
                                        "Compiled CPU tree-min kernel; called through ctypes (hieraloss._native).",
                                        -1, nullptr};

PyMODINIT_FUNC PyInit__tree_min(void) { return PyModule_Create(&module_def); }
