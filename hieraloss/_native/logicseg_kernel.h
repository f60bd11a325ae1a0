// LogicSeg's objective on the CPU (the math: hieraloss/core/logic.py), in two passes over the logits.
// Included once per instruction set by tree_min.cpp, after tree_min_kernel.h (it uses Math<T>).
// Layout: logits [B, N, P], label channels [B, P] (-1 = ignored), as the tree-min kernel.
//
// Pass "stats" (rules only): per clause, the sum over all pixels of viol^p:
//   child_implies_parent, clause e = (c, u):  viol = s_c (1 - s_u)
//   parent_implies_child, clause i = v:       viol = s_v (1 - max_{children} s), the earlier child at a tie
//   exclusion, unordered pair q = (a < b) of group g:  sum of s_a^p s_b^p over the group's hard pixels
//   and per group its number of hard pixels (every pixel without the easy filter).
// Pass "apply": the asymmetric BCE (its sum over the counted entries, and its gradient times
// asl_scale) and the rules' gradient from per-clause slopes the caller derives from the sums
// (core/logic.py: d value / d sum, times p); the gradient of a tile is written once.
//
// Powers: IP = 5 (p = 5, the default) multiplies; IP = 0 takes exp(p log v) (v in [0, 1]). The
// asymmetric loss's focusing weights likewise: FAST = (gamma_pos, gamma_neg) == (1, 4) multiplies.

#ifndef HIERALOSS_LOGICSEG_SHARED
#define HIERALOSS_LOGICSEG_SHARED

struct LogicTables {
  int64_t num_edges;
  const int32_t* edge_child;
  const int32_t* edge_parent;
  int64_t num_internal;
  const int32_t* internal;
  int64_t num_ranks;
  const int32_t* child_ranks;  // [num_ranks, num_internal], padded with a repeated child
  int64_t num_groups;
  const int32_t* group_offsets;  // [G + 1] into group_members
  const int32_t* group_members;
  int64_t num_pairs;  // sum over groups of n (n - 1) / 2, in group order, (a, b) with a before b
  int easy_filter;
  double p;
};

struct AslOptions {
  const int32_t* pre;  // DFS pre-order position per channel
  const int32_t* size;  // subtree size per channel
  double gamma_neg, gamma_pos, clip, eps;
  double scale;  // d objective / d (sum of the loss entries)
  int32_t size_v;  // set per node by the tile loop
};

#endif  // HIERALOSS_LOGICSEG_SHARED

namespace HIERALOSS_ISA {

// log(v) for v in (0, 1]: -log(1 / v) with 1 / v >= 1.
template <typename T>
static inline T log_unit(T v) {
  return -Math<T>::log_atleast1(T(1) / v);
}

// v^e for v in [0, 1] and e > 0 (0 for v = 0).
template <typename T>
static inline T pow_unit(T v, T e) {
  const T safe = v > T(0) ? v : T(1);
  const T r = Math<T>::exp_nonpos(e * log_unit(safe));
  return v > T(0) ? r : T(0);
}

template <typename T, int IP>
static inline T pow_p(T v, T p) {
  if (IP == 5) {
    const T v2 = v * v;
    return v2 * v2 * v;
  }
  return pow_unit(v, p);
}

template <typename T, int IP>
static inline T pow_pm1(T v, T p) {  // v^(p - 1); p >= 1
  if (IP == 5) {
    const T v2 = v * v;
    return v2 * v2;
  }
  return p == T(1) ? T(1) : pow_unit(v, p - T(1));
}

template <typename T>
struct LogicScratch {
  std::vector<T> s, ex, sp, gs, best, which, hard, partial;
  std::vector<double> sums;
  std::vector<int32_t> pc, lo, hi;
  int pending = 0;
  LogicScratch(int64_t N, int64_t clauses, int64_t tile)
      : s(N * tile), ex(N * tile), sp(N * tile), gs(N * tile), best(tile), which(tile), hard(tile), partial(clauses * tile),
        sums(clauses * tile), pc(tile), lo(tile), hi(tile) {}
  void flush() {
    for (size_t j = 0; j < partial.size(); ++j) {
      sums[j] += static_cast<double>(partial[j]);
      partial[j] = T(0);
    }
    pending = 0;
  }
};

// Scores of the tile: s = sigmoid(x) per channel row, and e = exp(-|x|) (the asymmetric loss's log s).
template <typename T>
static inline void tile_scores(const T* __restrict x, int64_t N, int64_t P, int64_t m, LogicScratch<T>& sc,
                               int64_t tile) {
  for (int64_t v = 0; v < N; ++v) {
    const T* __restrict xv = x + v * P;
    T* __restrict sv = sc.s.data() + v * tile;
    T* __restrict ev = sc.ex.data() + v * tile;
    for (int64_t t = 0; t < m; ++t) {
      const T z = xv[t];
      const T e = Math<T>::exp_nonpos(z < T(0) ? z : -z);
      const T inv = T(1) / (T(1) + e);
      sv[t] = z >= T(0) ? inv : e * inv;
      ev[t] = e;
    }
  }
}

// The max over the children of internal node i (an earlier child wins a tie) and its rank.
template <typename T>
static inline void children_max(const LogicTables& lt, int64_t i, int64_t m, LogicScratch<T>& sc, int64_t tile) {
  T* __restrict best = sc.best.data();
  T* __restrict which = sc.which.data();
  const T* __restrict first = sc.s.data() + lt.child_ranks[i] * tile;
  for (int64_t t = 0; t < m; ++t) {
    best[t] = first[t];
    which[t] = T(0);
  }
  for (int64_t r = 1; r < lt.num_ranks; ++r) {
    const T* __restrict nxt = sc.s.data() + lt.child_ranks[r * lt.num_internal + i] * tile;
    const T rank = static_cast<T>(r);
    for (int64_t t = 0; t < m; ++t) {
      const bool better = nxt[t] > best[t];
      best[t] = better ? nxt[t] : best[t];
      which[t] = better ? rank : which[t];
    }
  }
}

// The hard-pixel weights of group g (1, or 0 for an easy pixel under the filter).
template <typename T>
static inline void group_hard(const LogicTables& lt, int64_t g, int64_t m, LogicScratch<T>& sc, int64_t tile) {
  T* __restrict hard = sc.hard.data();
  const int32_t* mem = lt.group_members + lt.group_offsets[g];
  const int64_t n = lt.group_offsets[g + 1] - lt.group_offsets[g];
  if (!lt.easy_filter) {
    for (int64_t t = 0; t < m; ++t) hard[t] = T(1);
    return;
  }
  T* __restrict high = sc.best.data();  // scratch: counts of scores above 0.7 and below 0.3
  T* __restrict low = sc.which.data();
  for (int64_t t = 0; t < m; ++t) high[t] = low[t] = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T* __restrict sv = sc.s.data() + mem[k] * tile;
    for (int64_t t = 0; t < m; ++t) {
      high[t] += sv[t] > T(0.7) ? T(1) : T(0);
      low[t] += sv[t] < T(0.3) ? T(1) : T(0);
    }
  }
  const T rest = static_cast<T>(n - 1);
  for (int64_t t = 0; t < m; ++t) hard[t] = (high[t] == T(1)) & (low[t] == rest) ? T(0) : T(1);
}

template <typename T, int IP>
static void stats_tile(const T* __restrict x, int64_t N, int64_t P, int64_t m, const LogicTables& lt,
                       LogicScratch<T>& sc, int64_t tile) {  // x: the tile's first logit
  const T p = static_cast<T>(lt.p);
  tile_scores(x, N, P, m, sc, tile);
  int64_t clause = 0;
  for (int64_t e = 0; e < lt.num_edges; ++e, ++clause) {
    const T* __restrict sc_ = sc.s.data() + lt.edge_child[e] * tile;
    const T* __restrict su = sc.s.data() + lt.edge_parent[e] * tile;
    T* __restrict acc = sc.partial.data() + clause * tile;
    for (int64_t t = 0; t < m; ++t) acc[t] += pow_p<T, IP>(sc_[t] - sc_[t] * su[t], p);
  }
  for (int64_t i = 0; i < lt.num_internal; ++i, ++clause) {
    children_max(lt, i, m, sc, tile);
    const T* __restrict sv = sc.s.data() + lt.internal[i] * tile;
    const T* __restrict best = sc.best.data();
    T* __restrict acc = sc.partial.data() + clause * tile;
    for (int64_t t = 0; t < m; ++t) acc[t] += pow_p<T, IP>(sv[t] - sv[t] * best[t], p);
  }
  for (int64_t g = 0; g < lt.num_groups; ++g) {
    const int32_t* mem = lt.group_members + lt.group_offsets[g];
    const int64_t n = lt.group_offsets[g + 1] - lt.group_offsets[g];
    group_hard(lt, g, m, sc, tile);
    const T* __restrict hard = sc.hard.data();
    for (int64_t k = 0; k < n; ++k) {
      const T* __restrict sv = sc.s.data() + mem[k] * tile;
      T* __restrict spv = sc.sp.data() + mem[k] * tile;
      for (int64_t t = 0; t < m; ++t) spv[t] = pow_p<T, IP>(sv[t], p) * hard[t];
    }
    for (int64_t a = 0; a < n; ++a)
      for (int64_t b = a + 1; b < n; ++b, ++clause) {
        const T* __restrict sa = sc.sp.data() + mem[a] * tile;
        const T* __restrict sb = sc.sp.data() + mem[b] * tile;
        T* __restrict acc = sc.partial.data() + clause * tile;
        for (int64_t t = 0; t < m; ++t) acc[t] += sa[t] * sb[t];
      }
  }
  for (int64_t g = 0; g < lt.num_groups; ++g, ++clause) {  // hard-pixel counts, last
    group_hard(lt, g, m, sc, tile);
    T* __restrict acc = sc.partial.data() + clause * tile;
    const T* __restrict hard = sc.hard.data();
    for (int64_t t = 0; t < m; ++t) acc[t] += hard[t];
  }
}

// The asymmetric loss's entries of node v over the tile: their sum into acc, d/dx times scale into g.
template <typename T, bool FAST, bool GRAD>
static inline void asl_node(const T* __restrict xv, const T* __restrict sv, const T* __restrict ev, int32_t pre_v,
                            const AslOptions& o, int64_t m, const LogicScratch<T>& sc, T* __restrict acc,
                            T* __restrict g) {
  const T gp = static_cast<T>(o.gamma_pos), gn = static_cast<T>(o.gamma_neg);
  const T clip = static_cast<T>(o.clip), eps = static_cast<T>(o.eps), scale = static_cast<T>(o.scale);
  const int32_t end_v = pre_v + o.size_v;
  const int32_t* __restrict pc = sc.pc.data();
  const int32_t* __restrict lo = sc.lo.data();
  const int32_t* __restrict hi = sc.hi.data();
  for (int64_t t = 0; t < m; ++t) {
    const bool pos = (pre_v <= pc[t]) & (pc[t] < end_v);
    const bool unknown = (pre_v >= lo[t]) & (pre_v < hi[t]);
    const T s = sv[t];
    const T z = xv[t];
    // positive: -(1 - s)^gp log(max(s, eps)), with log s = -(max(-z, 0) + log1p(exp(-|z|)))
    const T e = ev[t];
    const T log_s = -((z < T(0) ? -z : T(0)) + Math<T>::log1p_unit(e, e / (T(2) + e)));
    const bool s_ok = s > eps;
    const T ls = s_ok ? log_s : log_unit(eps);
    const T q = T(1) - s;
    const T wp = FAST ? q : (gp == T(0) ? T(1) : pow_unit(q, gp));
    // negative: -(max(s - clip, 0))^gn log(max(min(1 - s + clip, 1), eps))
    const bool clipped = s <= clip;  // then s_neg = 1: loss 0, gradient 0
    const T sn_raw = q + clip;
    const T sn = clipped ? T(1) : sn_raw;
    const bool sn_ok = sn > eps;
    const T ln = sn_ok ? log_unit(sn) : log_unit(eps);
    const T r = clipped ? T(0) : s - clip;
    T wn, dwn;
    if (FAST) {
      const T r2 = r * r;
      wn = r2 * r2;
      dwn = T(4) * r2 * r;
    } else {
      wn = gn == T(0) ? T(1) : pow_unit(r, gn);
      dwn = gn == T(0) ? T(0) : gn * pow_unit(r, gn - T(1));
    }
    const T loss = pos ? -wp * ls : -wn * ln;
    acc[t] += unknown ? T(0) : loss;
    if (GRAD) {
      // d/ds, then times s (1 - s)
      T dwp;
      if (FAST) {
        dwp = T(-1);
      } else {
        dwp = gp == T(0) ? T(0) : -gp * (gp == T(1) ? T(1) : pow_unit(q, gp - T(1)));
      }
      const T dpos = -(dwp * ls + (s_ok ? wp / s : T(0)));
      const T dneg = clipped ? T(0) : -(dwn * ln - (sn_ok ? wn / sn : T(0)));
      const T d = (pos ? dpos : dneg) * s * q * scale;
      g[t] = unknown ? T(0) : d;
    }
  }
}

template <typename T, int IP, bool FAST>
static void apply_tile(const T* __restrict x, const int64_t* __restrict lc, int64_t b, int64_t p0, int64_t N,
                       int64_t P, int64_t m, const LogicTables* lt, const double* slopes, const AslOptions* asl,
                       T* __restrict grad, LogicScratch<T>& sc, int64_t tile) {
  const int64_t base = b * N * P + p0;
  tile_scores(x + base, N, P, m, sc, tile);
  const bool rules = lt != nullptr && slopes != nullptr;
  T* __restrict gs = sc.gs.data();
  if (grad)
    for (int64_t j = 0; j < N * tile; ++j) gs[j] = T(0);
  if (rules && grad) {
    const T p = static_cast<T>(lt->p);
    int64_t clause = 0;
    for (int64_t e = 0; e < lt->num_edges; ++e, ++clause) {
      const T k = static_cast<T>(slopes[clause]);
      const T* __restrict sc_ = sc.s.data() + lt->edge_child[e] * tile;
      const T* __restrict su = sc.s.data() + lt->edge_parent[e] * tile;
      T* __restrict gc = gs + lt->edge_child[e] * tile;
      T* __restrict gu = gs + lt->edge_parent[e] * tile;
      for (int64_t t = 0; t < m; ++t) {
        const T dv = k * pow_pm1<T, IP>(sc_[t] - sc_[t] * su[t], p);
        gc[t] += dv * (T(1) - su[t]);
        gu[t] -= dv * sc_[t];
      }
    }
    for (int64_t i = 0; i < lt->num_internal; ++i, ++clause) {
      const T k = static_cast<T>(slopes[clause]);
      children_max(*lt, i, m, sc, tile);
      const T* __restrict sv = sc.s.data() + lt->internal[i] * tile;
      T* __restrict best = sc.best.data();
      T* __restrict gv = gs + lt->internal[i] * tile;
      T* __restrict hard = sc.hard.data();  // scratch: d viol / d best
      for (int64_t t = 0; t < m; ++t) {
        const T dv = k * pow_pm1<T, IP>(sv[t] - sv[t] * best[t], p);
        gv[t] += dv * (T(1) - best[t]);
        hard[t] = dv * sv[t];
      }
      const T* __restrict which = sc.which.data();
      for (int64_t r = 0; r < lt->num_ranks; ++r) {
        const int32_t c = lt->child_ranks[r * lt->num_internal + i];
        T* __restrict gc = gs + c * tile;
        const T rank = static_cast<T>(r);
        for (int64_t t = 0; t < m; ++t) gc[t] -= which[t] == rank ? hard[t] : T(0);
      }
    }
    for (int64_t g = 0; g < lt->num_groups; ++g) {
      const int32_t* mem = lt->group_members + lt->group_offsets[g];
      const int64_t n = lt->group_offsets[g + 1] - lt->group_offsets[g];
      group_hard(*lt, g, m, sc, tile);
      const T* __restrict hard = sc.hard.data();
      // sp = s^p * hard; the slopes already carry the factor p of d s^p / d s
      for (int64_t kk = 0; kk < n; ++kk) {
        const T* __restrict sv = sc.s.data() + mem[kk] * tile;
        T* __restrict spv = sc.sp.data() + mem[kk] * tile;
        for (int64_t t = 0; t < m; ++t) spv[t] = pow_p<T, IP>(sv[t], p) * hard[t];
      }
      for (int64_t a = 0; a < n; ++a) {
        const T* __restrict sa = sc.s.data() + mem[a] * tile;
        T* __restrict ga = gs + mem[a] * tile;
        // d/ds_a of sum_b (coef_ab / p) s_a^p s_b^p hard = s_a^(p-1) hard sum_b coef_ab sp_b
        T* __restrict accum = sc.best.data();
        for (int64_t t = 0; t < m; ++t) accum[t] = T(0);
        for (int64_t bb = 0; bb < n; ++bb) {
          if (bb == a) continue;
          const int64_t lo_ = a < bb ? a : bb, hi_ = a < bb ? bb : a;
          // the pair's index within the group: pairs (lo, hi) in order
          const int64_t q = clause + lo_ * n - lo_ * (lo_ + 1) / 2 + (hi_ - lo_ - 1);
          const T coef = static_cast<T>(slopes[q]);
          const T* __restrict sb = sc.sp.data() + mem[bb] * tile;
          for (int64_t t = 0; t < m; ++t) accum[t] += coef * sb[t];
        }
        for (int64_t t = 0; t < m; ++t) ga[t] += accum[t] * pow_pm1<T, IP>(sa[t], p) * hard[t];
      }
      clause += n * (n - 1) / 2;
    }
    for (int64_t j = 0; j < N * tile; j += tile) {  // to d/dx: times s (1 - s)
      const T* __restrict sv = sc.s.data() + j;
      T* __restrict gv = gs + j;
      for (int64_t t = 0; t < m; ++t) gv[t] *= sv[t] * (T(1) - sv[t]);
    }
  }
  if (asl) {
    int32_t* __restrict pc = sc.pc.data();
    int32_t* __restrict lo = sc.lo.data();
    int32_t* __restrict hi = sc.hi.data();
    for (int64_t t = 0; t < m; ++t) {
      const int64_t c = lc[b * P + p0 + t];
      const bool ok = c >= 0 && c < N;
      const int64_t safe = ok ? c : 0;
      pc[t] = ok ? asl->pre[safe] : -1;
      lo[t] = ok ? asl->pre[safe] + 1 : 0;
      hi[t] = ok ? asl->pre[safe] + asl->size[safe] : static_cast<int32_t>(N);
    }
    T* __restrict acc = sc.partial.data();
    T* __restrict tmp = sc.best.data();
    for (int64_t v = 0; v < N; ++v) {
      AslOptions o = *asl;
      o.size_v = asl->size[v];
      if (grad) {
        asl_node<T, FAST, true>(x + base + v * P, sc.s.data() + v * tile, sc.ex.data() + v * tile, asl->pre[v], o,
                                m, sc, acc, tmp);
        T* __restrict gv = gs + v * tile;
        if (rules)
          for (int64_t t = 0; t < m; ++t) gv[t] += tmp[t];
        else
          for (int64_t t = 0; t < m; ++t) gv[t] = tmp[t];
      } else {
        asl_node<T, FAST, false>(x + base + v * P, sc.s.data() + v * tile, sc.ex.data() + v * tile, asl->pre[v],
                                 o, m, sc, acc, tmp);
      }
    }
  }
  if (grad)
    for (int64_t v = 0; v < N; ++v) {
      const T* __restrict gv = gs + v * tile;
      T* __restrict out = grad + base + v * P;
      for (int64_t t = 0; t < m; ++t) out[t] = gv[t];
    }
}

// Items [first, last) of the (image, tile) grid; clause sums (stats) or the ASL sum (apply) added into out.
template <typename T>
static void logic_run(const T* x, const int64_t* lc, int64_t N, int64_t P, int64_t tile, int64_t tiles_per_image,
                      int64_t first, int64_t last, const LogicTables* lt, bool stats, const double* slopes,
                      const AslOptions* asl, T* grad, double* out, int64_t clauses) {
  LogicScratch<T> sc(N, clauses, tile);
  const bool ip5 = lt != nullptr && lt->p == 5.0;
  const bool fast = asl != nullptr && asl->gamma_pos == 1.0 && asl->gamma_neg == 4.0;
  for (int64_t item = first; item < last; ++item) {
    const int64_t b = item / tiles_per_image, p0 = (item % tiles_per_image) * tile;
    const int64_t m = std::min(tile, P - p0);
    if (stats) {
      const T* xt = x + b * N * P + p0;
      if (ip5)
        stats_tile<T, 5>(xt, N, P, m, *lt, sc, tile);
      else
        stats_tile<T, 0>(xt, N, P, m, *lt, sc, tile);
    } else if (ip5) {
      if (fast)
        apply_tile<T, 5, true>(x, lc, b, p0, N, P, m, lt, slopes, asl, grad, sc, tile);
      else
        apply_tile<T, 5, false>(x, lc, b, p0, N, P, m, lt, slopes, asl, grad, sc, tile);
    } else {
      if (fast)
        apply_tile<T, 0, true>(x, lc, b, p0, N, P, m, lt, slopes, asl, grad, sc, tile);
      else
        apply_tile<T, 0, false>(x, lc, b, p0, N, P, m, lt, slopes, asl, grad, sc, tile);
    }
    if (++sc.pending == kFlushTiles) sc.flush();
  }
  sc.flush();
  for (int64_t c = 0; c < clauses; ++c)
    for (int64_t t = 0; t < tile; ++t) out[c] += sc.sums[c * tile + t];
}

}  // namespace HIERALOSS_ISA
