// Tree-min / focal tree-min loss and gradient on the CPU, one pass over the logits.
// Included twice by tree_min.cpp: once for the baseline ISA, once under an AVX2+FMA target.
// Layout: logits [B, N, P] (P = spatial positions), label channels [B, P] (-1 = ignored).
//
// Pixels are processed in tiles of `tile` consecutive positions; every loop below runs over the
// pixels of a tile, so it is a straight vector loop (selects, no branches, no libm calls for float).
//
// Per entry (node v, pixel t) with label channel c:
//   positive (v is c or an ancestor of c): l = term(-zmin_v), d l / d zmin_v = -dterm(-zmin_v)
//   unknown  (v strictly below c, or the pixel is ignored): l = 0, no gradient
//   negative (otherwise): l = term(zmax_v), d l / d zmax_v = dterm(zmax_v)
// with term(z) = sigmoid(z)^gamma * softplus(z). Ancestry is tested with DFS pre-order positions:
// v is c or above it iff pre[v] <= pre[c] < pre[v] + size[v].
// The gradient at zmax_v goes to the first node of D(v) in DFS pre-order attaining it (via[v]
// chains), the gradient at zmin_v to the shallowest node of A(v) attaining it (keep flags).
//
// Optionally (the HSSN objective), the same pass adds for every depth d the cross-entropy over the
// classes at depth d (Tree::class_channels: the nodes at depth d plus the leaves shallower than d):
//   ce_d = log sum_{v in classes(d)} exp(x_v - max) + max - x_target, target = Tree::ce_target[c, d]
//   (the class of A(c) at depth d: c itself for a leaf shallower than d; -1 where the pixel does not
//   count: a partial label coarser than d; ignored pixels never count); its gradient
//   ce_grad_scale[d] * (softmax_v - [v == target]) is added to the tree-min gradient before the single
//   write of the tile. Per depth: a max pass and an exp-sum pass over the class rows, a gather of the
//   target logits, then (gradient) a pass adding softmax * scale and a scatter of -scale at the targets.

// Shared by every instruction-set variant: defined on the first inclusion only.
#ifndef HIERALOSS_TREE_MIN_SHARED
#define HIERALOSS_TREE_MIN_SHARED

struct Tree {
  int64_t num_nodes;
  const int32_t* edges;  // [num_edges, 2] (child, parent), deepest children first, siblings in tie order
  int64_t num_edges;
  const int32_t* pre;  // DFS pre-order position per channel
  const int32_t* size;  // subtree size per channel (itself included)
  const uint8_t* is_child;  // 1 for nodes with a parent channel (not depth 1)
  // Cross-entropy classes per depth (read only when a CE output is asked for):
  int64_t num_depths;  // L
  const int32_t* class_offsets;  // [L + 1]: depth d's classes are class_channels[offsets[d-1] .. offsets[d])
  const int32_t* class_channels;  // ascending channels within a depth
  const int32_t* ce_target;  // [N, L]: the class at depth d+1 of a pixel labelled c, -1 where it does not count
  int64_t max_classes;  // largest class count of a depth
};

template <typename T>
struct Outputs {
  double* channel_sums;  // [N] per-thread slice, or null
  T* loss_map;  // [B, N, P] or null
  const double* map_scale;  // [N] or null
  T* grad;  // [B, N, P] or null
  const double* grad_scale;  // [N] or null
  const T* grad_up;  // [B, N, P] or null
  double* ce_sums;  // [L] per-thread slice of the per-depth cross-entropy sums, or null
  const double* ce_grad_scale;  // [L]: the cross-entropy's share of the gradient, or null (tree-min only)
};

// Loss sums are kept per lane ([N, tile]; a plain running sum would not vectorize): `partial` in T over
// at most kFlushTiles tiles, then added into `sums` in double (few float additions per lane, so
// the rounding stays near 1e-7 relative however many pixels there are).
constexpr int kFlushTiles = 8;

// Which output combinations the kernel is instantiated for (flags: sums 8, map 4, grad 2, grad_up 1,
// ce_sums 16, ce_grad_scale 32). The cross-entropy rides along with the scalar sets only.
static inline bool supported_outputs(int which) {
  return which == 8 || which == (8 | 2) || which == 4 || which == 2 || which == (2 | 1) || which == (8 | 16) ||
         which == (8 | 16 | 2 | 32) || which == (2 | 32);
}

#endif  // HIERALOSS_TREE_MIN_SHARED

namespace HIERALOSS_ISA {

template <typename T>
struct Math;

template <>
struct Math<float> {
  static inline float bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  // exp(x) for x <= 0 (NaN stays NaN): Cody-Waite reduction to |r| <= ln2/2 and a degree-6 minimax
  // polynomial (under 1.4 ulp); the power of two is applied in two steps so subnormal results come out right.
  static inline float exp_nonpos(float x) {
    x = x < -103.0f ? -103.0f : x;
    float k = x * 1.44269504088896341f;
    k = (k + 12582912.0f) - 12582912.0f;  // round to nearest integer (|k| < 2^22)
    float r = x - k * 0.693145751953125f;
    r = r - k * 1.428606765330187045e-06f;
    float p = 0.0013836845845019903f;
    p = p * r + 0.00837481580396822f;
    p = p * r + 0.04166822557223526f;
    p = p * r + 0.166664201698566f;
    p = p * r + 0.4999999207980415f;
    p = p * r + 1.0000000363231951f;
    p = p * r + 1.0000000005541674f;
    int32_t ki = static_cast<int32_t>(k == k ? k : 0.0f);
    int32_t k1 = ki / 2;
    int32_t k2 = ki - k1;
    return p * bits(static_cast<uint32_t>(k1 + 127) << 23) * bits(static_cast<uint32_t>(k2 + 127) << 23);
  }
  // log(1 + e) for e in [0, 1], given f = e / (2 + e) <= 1/3: 2 atanh(f) = 2 f q(f^2) with a degree-4
  // minimax q (no cancellation for small e; under 3 ulp in all).
  static inline float log1p_unit(float /*e*/, float f) {
    float w = f * f;
    float q = 0.14095773154012106f;
    q = q * w + 0.13978832999385885f;
    q = q * w + 0.20012557154769534f;
    q = q * w + 0.3333315507259387f;
    q = q * w + 1.0000000040393686f;
    return 2.0f * f * q;
  }
  // log(s) for finite s >= 1 (a sum of exponentials, each <= 1, one of them 1): s = 2^k * g with g in
  // [sqrt(1/2), sqrt(2)) from the bits (integer ops only: vectorizes), log(g) = log1p(g - 1) by the
  // polynomial above (|f| <= 0.172), plus k ln2 in two parts. A NaN s gives garbage: callers select.
  static inline float log_atleast1(float s) {
    uint32_t u;
    std::memcpy(&u, &s, sizeof u);
    u += 0x3f800000u - 0x3f3504f3u;  // bias so that the exponent field is k for g in [sqrt(1/2), sqrt(2))
    const int32_t k = static_cast<int32_t>(u >> 23) - 127;
    const float g = bits((u & 0x007fffffu) + 0x3f3504f3u);
    const float e = g - 1.0f;
    const float kf = static_cast<float>(k);
    const float l = log1p_unit(e, e / (2.0f + e));
    return kf * 0.693145751953125f + (l + kf * 1.428606765330187045e-06f);
  }
};

template <>
struct Math<double> {
  static inline double exp_nonpos(double x) { return std::exp(x); }
  static inline double log1p_unit(double e, double /*f*/) { return std::log1p(e); }
  static inline double log_atleast1(double s) { return std::log(s); }
};

// FOCAL: 0 = plain tree-min (gamma 0), 2 = gamma exactly 2 (s * s), 1 = any other gamma.
template <typename T, int FOCAL>
static inline void negative_term(T z, T gamma, T& term, T& dterm) {
  T az = z < T(0) ? -z : z;
  T e = Math<T>::exp_nonpos(-az);
  T r = T(1) / ((T(1) + e) * (T(2) + e));  // one division for both quotients below
  T l = Math<T>::log1p_unit(e, e * (T(1) + e) * r);  // log1p(e); f = e / (2 + e)
  T inv = (T(2) + e) * r;  // 1 / (1 + e)
  T a = e * inv;
  bool nonneg = z >= T(0);
  T s = nonneg ? inv : a;  // sigmoid(z)
  T sp = (z > T(0) ? z : T(0)) + l;  // softplus(z)
  if (FOCAL == 0) {
    term = sp;
    dterm = s;
    return;
  }
  T sn = nonneg ? a : inv;  // sigmoid(-z), not 1 - s (cancellation)
  T sg;
  if (FOCAL == 2) {
    sg = s * s;
  } else {
    T spn = (z < T(0) ? -z : T(0)) + l;  // softplus(-z) = -log sigmoid(z)
    sg = Math<T>::exp_nonpos(-gamma * spn);
  }
  term = sg * sp;
  dterm = sg * (gamma * sn * sp + s);
}

template <typename T>
struct Scratch {
  std::vector<T> zmax, zmin, partial;
  std::vector<double> sums;
  std::vector<int32_t> via, keep, pc, lo, hi;
  // Cross-entropy: per-depth lane sums (like partial/sums), the CE gradient of every channel of the
  // tile (zero between tiles), exp(x - max) of one depth's classes, and per-pixel rows (max, sum of
  // exponentials, target logit, gradient factor).
  std::vector<T> ce_partial, ce_grad, ce_exp, ce_max, ce_sum, ce_xt, ce_w;
  std::vector<double> ce_totals;
  std::vector<int32_t> ce_tgt;  // [L, tile]: the target class per depth and pixel, -1 = not counted
  int pending = 0;  // tiles summed into `partial` since the last flush
  Scratch(const Tree& tr, int64_t tile, bool with_sums, bool ce_sums, bool ce_grad)
      : zmax(tr.num_nodes * tile), zmin(tr.num_nodes * tile), partial(with_sums ? tr.num_nodes * tile : 0),
        sums(with_sums ? tr.num_nodes * tile : 0), via(tr.num_nodes * tile), keep(tr.num_nodes * tile), pc(tile),
        lo(tile), hi(tile), ce_partial(ce_sums ? tr.num_depths * tile : 0),
        ce_grad(ce_grad ? tr.num_nodes * tile : 0), ce_exp(ce_grad ? tr.max_classes * tile : 0),
        ce_max(ce_sums || ce_grad ? tile : 0), ce_sum(ce_max.size()), ce_xt(ce_max.size()),
        ce_w(ce_grad ? tile : 0), ce_totals(ce_partial.size()),
        ce_tgt(ce_max.size() * tr.num_depths) {}
  void flush() {
    for (size_t j = 0; j < partial.size(); ++j) {
      sums[j] += static_cast<double>(partial[j]);
      partial[j] = T(0);
    }
    for (size_t j = 0; j < ce_partial.size(); ++j) {
      ce_totals[j] += static_cast<double>(ce_partial[j]);
      ce_partial[j] = T(0);
    }
    pending = 0;
  }
};

// The loss terms of node v over the m pixels of a tile (compile-time outputs: a branch-free vector loop).
template <typename T, int FOCAL, bool SUMS, bool MAP, bool GRAD, bool UP>
static inline void entry_terms(int64_t v, int64_t m, int64_t base, int64_t P, const Tree& tr, T gamma,
                               const Outputs<T>& out, Scratch<T>& s, int64_t tile) {
  const int32_t pre_v = tr.pre[v], end_v = tr.pre[v] + tr.size[v];
  const int32_t* __restrict pc = s.pc.data();
  const int32_t* __restrict lo = s.lo.data();
  const int32_t* __restrict hi = s.hi.data();
  T* __restrict a = s.zmax.data() + v * tile;
  T* __restrict i = s.zmin.data() + v * tile;
  T* __restrict map = MAP ? out.loss_map + base + v * P : nullptr;
  const T map_w = MAP && out.map_scale ? static_cast<T>(out.map_scale[v]) : T(1);
  const T grad_w = GRAD && out.grad_scale ? static_cast<T>(out.grad_scale[v]) : T(1);
  const T* __restrict up = UP ? out.grad_up + base + v * P : nullptr;
  T* __restrict acc = SUMS ? s.partial.data() + v * tile : nullptr;
  for (int64_t t = 0; t < m; ++t) {
    bool pos = (pre_v <= pc[t]) & (pc[t] < end_v);
    bool unknown = (pre_v >= lo[t]) & (pre_v < hi[t]);
    T z = pos ? -i[t] : a[t];
    T term, dterm;
    negative_term<T, FOCAL>(z, gamma, term, dterm);
    T loss = unknown ? T(0) : term;
    if (SUMS) acc[t] += loss;
    if (MAP) map[t] = loss * map_w;
    if (GRAD) {
      T g = dterm * grad_w;
      if (UP) g = g * up[t];
      g = unknown ? T(0) : g;
      a[t] = pos ? T(0) : g;
      i[t] = pos ? -g : T(0);
    }
  }
}

// The cross-entropy of every depth over the m pixels of a tile (x: the tile's first logit; rows of
// stride P; s.ce_tgt: the target class per depth and pixel). Per depth: max, sum of exp(x - max),
// target logit, loss, then (GRAD) the gradient added into ce_grad. Each step is a loop over the
// pixels of the tile, like the tree-min terms.
template <typename T, bool SUMS, bool GRAD>
static inline void cross_entropy_terms(const T* __restrict x, int64_t m, int64_t P, const Tree& tr,
                                       const Outputs<T>& out, Scratch<T>& s, int64_t tile) {
  T* __restrict mx = s.ce_max.data();
  T* __restrict sum = s.ce_sum.data();
  T* __restrict xt = s.ce_xt.data();
  for (int64_t d = 0; d < tr.num_depths; ++d) {
    const int32_t* cls = tr.class_channels + tr.class_offsets[d];
    const int64_t K = tr.class_offsets[d + 1] - tr.class_offsets[d];
    const int32_t* __restrict tgt = s.ce_tgt.data() + d * tile;
    // Max over the classes (a class replaces it only when strictly larger, or NaN: NaN propagates).
    {
      const T* __restrict xv = x + cls[0] * P;
      for (int64_t t = 0; t < m; ++t) mx[t] = xv[t];
    }
    for (int64_t k = 1; k < K; ++k) {
      const T* __restrict xv = x + cls[k] * P;
      for (int64_t t = 0; t < m; ++t) {
        const T xvt = xv[t];
        const bool take = (xvt > mx[t]) | (xvt != xvt);
        mx[t] = take ? xvt : mx[t];
      }
    }
    for (int64_t t = 0; t < m; ++t) sum[t] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* __restrict xv = x + cls[k] * P;
      T* __restrict e = GRAD ? s.ce_exp.data() + k * tile : nullptr;
      for (int64_t t = 0; t < m; ++t) {
        const T ev = Math<T>::exp_nonpos(xv[t] - mx[t]);  // the argument is <= 0 (or NaN: stays NaN)
        sum[t] += ev;
        if (GRAD) e[t] = ev;
      }
    }
    T* __restrict acc = SUMS ? s.ce_partial.data() + d * tile : nullptr;
    T* __restrict w = GRAD ? s.ce_w.data() : nullptr;
    const T gs = GRAD ? static_cast<T>(out.ce_grad_scale[d]) : T(0);
    if (SUMS) {
      for (int64_t t = 0; t < m; ++t) {  // the target's logit (a gather)
        const int32_t c = tgt[t];
        xt[t] = x[(c < 0 ? 0 : c) * P + t];
      }
    }
    for (int64_t t = 0; t < m; ++t) {
      const T sv = sum[t];  // in [1, K], or NaN
      const bool counted = tgt[t] >= 0;
      if (SUMS) {
        const T lg = Math<T>::log_atleast1(sv);
        const T loss = (mx[t] - xt[t]) + (sv == sv ? lg : sv);  // the difference first: exact when close
        acc[t] += counted ? loss : T(0);
      }
      if (GRAD) w[t] = counted ? gs / sv : T(0);
    }
    if (!GRAD || gs == T(0)) continue;  // a depth without weight adds nothing to the gradient
    // d ce / d x_v = gs * (softmax_v - [v is the target]) at counted pixels, 0 elsewhere.
    for (int64_t k = 0; k < K; ++k) {
      const T* __restrict e = s.ce_exp.data() + k * tile;
      T* __restrict cg = s.ce_grad.data() + cls[k] * tile;
      for (int64_t t = 0; t < m; ++t) {
        const T g = w[t] * e[t];
        cg[t] += w[t] != T(0) ? g : T(0);  // w is 0 where the pixel does not count (e may be NaN there)
      }
    }
    T* __restrict cg = s.ce_grad.data();
    for (int64_t t = 0; t < m; ++t) {  // minus gs at the target (a scatter)
      const int32_t c = tgt[t];
      if (c >= 0) cg[c * tile + t] -= gs;
    }
  }
}

// One tile: pixels [p0, p0 + m) of image b.
template <typename T, int FOCAL>
static void tile_pass(const T* __restrict x, const int64_t* __restrict lc, int64_t b, int64_t p0, int64_t m,
                      int64_t P, const Tree& tr, T gamma, const Outputs<T>& out, Scratch<T>& s, int64_t tile) {
  const int64_t N = tr.num_nodes;
  const int64_t base = b * N * P + p0;
  int32_t* __restrict pc = s.pc.data();
  int32_t* __restrict lo = s.lo.data();
  int32_t* __restrict hi = s.hi.data();
  for (int64_t t = 0; t < m; ++t) {
    const int64_t c = lc[b * P + p0 + t];
    const bool ok = c >= 0 && c < N;  // callers pass validated channels; anything else counts as ignored
    const int64_t safe = ok ? c : 0;
    const int32_t pre_c = tr.pre[safe], size_c = tr.size[safe];
    pc[t] = ok ? pre_c : -1;
    lo[t] = ok ? pre_c + 1 : 0;  // unknown entries: pre-order positions in [lo, hi)
    hi[t] = ok ? pre_c + size_c : static_cast<int32_t>(N);
  }
  T* __restrict zmax = s.zmax.data();
  T* __restrict zmin = s.zmin.data();
  int32_t* __restrict via = s.via.data();
  int32_t* __restrict keep = s.keep.data();
  // zmax starts as x with every node its own argmax; zmin and keep are written for every child by the
  // top-down sweep below, so only the depth-1 nodes (roots of their subtrees) need them here.
  for (int64_t v = 0; v < N; ++v) {
    const T* xv = x + base + v * P;
    T* a = zmax + v * tile;
    int32_t* w = via + v * tile;
    const int32_t self = static_cast<int32_t>(v);
    for (int64_t t = 0; t < m; ++t) {
      a[t] = xv[t];
      w[t] = self;
    }
    if (tr.is_child[v]) continue;
    T* i = zmin + v * tile;
    int32_t* k = keep + v * tile;
    for (int64_t t = 0; t < m; ++t) {
      i[t] = xv[t];
      k[t] = 1;
    }
  }
  // Ask for the next tile's logits (and gradient lines) now: they arrive while this tile computes.
  if (p0 + m < P) {
    const int64_t next = std::min(m, P - p0 - m);
    for (int64_t v = 0; v < N; ++v) {
      const T* xv = x + base + v * P + m;
      for (int64_t t = 0; t < next; t += 64 / static_cast<int64_t>(sizeof(T))) HIERALOSS_PREFETCH(xv + t, 0);
      if (out.grad) {
        T* gv = out.grad + base + v * P + m;
        for (int64_t t = 0; t < next; t += 64 / static_cast<int64_t>(sizeof(T))) HIERALOSS_PREFETCH(gv + t, 1);
      }
    }
  }
  // zmax bottom-up: a child replaces its parent's max only when strictly larger (or NaN), so the
  // parent itself, then earlier siblings, win ties.
  for (int64_t e = 0; e < tr.num_edges; ++e) {
    const int32_t kid = tr.edges[2 * e], par = tr.edges[2 * e + 1];
    const T* zk = zmax + kid * tile;
    T* zp = zmax + par * tile;
    int32_t* wp = via + par * tile;
    for (int64_t t = 0; t < m; ++t) {
      bool take = (zk[t] > zp[t]) | (zk[t] != zk[t]);
      zp[t] = take ? zk[t] : zp[t];
      wp[t] = take ? kid : wp[t];
    }
  }
  // zmin top-down: a node keeps its own logit only when strictly smaller (or NaN): the shallowest wins ties.
  for (int64_t e = tr.num_edges - 1; e >= 0; --e) {
    const int32_t kid = tr.edges[2 * e], par = tr.edges[2 * e + 1];
    const T* xk = x + base + kid * P;
    const T* zp = zmin + par * tile;
    T* zk = zmin + kid * tile;
    int32_t* kk = keep + kid * tile;
    for (int64_t t = 0; t < m; ++t) {
      bool own = (xk[t] < zp[t]) | (xk[t] != xk[t]);
      zk[t] = own ? xk[t] : zp[t];
      kk[t] = own ? 1 : 0;
    }
  }
  // Cross-entropy per depth (HSSN objective): its gradient waits in ce_grad for the single write below.
  if (out.ce_sums || out.ce_grad_scale) {
    int32_t* __restrict tgt = s.ce_tgt.data();
    const int64_t L = tr.num_depths;
    for (int64_t t = 0; t < m; ++t) {
      const int64_t c = lc[b * P + p0 + t];
      const bool ok = c >= 0 && c < N;
      const int32_t* row = tr.ce_target + (ok ? c : 0) * L;
      for (int64_t d = 0; d < L; ++d) tgt[d * tile + t] = ok ? row[d] : -1;
    }
    if (out.ce_sums && out.ce_grad_scale) {
      cross_entropy_terms<T, true, true>(x + base, m, P, tr, out, s, tile);
    } else if (out.ce_sums) {
      cross_entropy_terms<T, true, false>(x + base, m, P, tr, out, s, tile);
    } else {
      cross_entropy_terms<T, false, true>(x + base, m, P, tr, out, s, tile);
    }
  }
  // Entry terms. From here zmax holds d loss / d zmax (negatives) and zmin d loss / d zmin (positives).
  const int which = (out.channel_sums ? 8 : 0) | (out.loss_map ? 4 : 0) | (out.grad ? 2 : 0) | (out.grad_up ? 1 : 0);
  for (int64_t v = 0; v < N; ++v) {
    switch (which) {
      case 8: entry_terms<T, FOCAL, true, false, false, false>(v, m, base, P, tr, gamma, out, s, tile); break;
      case 8 | 2: entry_terms<T, FOCAL, true, false, true, false>(v, m, base, P, tr, gamma, out, s, tile); break;
      case 4: entry_terms<T, FOCAL, false, true, false, false>(v, m, base, P, tr, gamma, out, s, tile); break;
      case 2: entry_terms<T, FOCAL, false, false, true, false>(v, m, base, P, tr, gamma, out, s, tile); break;
      case 2 | 1: entry_terms<T, FOCAL, false, false, true, true>(v, m, base, P, tr, gamma, out, s, tile); break;
      default: break;  // rejected by supported_outputs() before any work
    }
  }
  const bool want_grad = out.grad != nullptr;
  if (!want_grad) return;
  // Route: negative gradients down the via chains (parents before children), positive gradients
  // up to the shallowest node attaining zmin (children before parents).
  for (int64_t e = tr.num_edges - 1; e >= 0; --e) {
    const int32_t kid = tr.edges[2 * e], par = tr.edges[2 * e + 1];
    const T* gp = zmax + par * tile;
    const int32_t* wp = via + par * tile;
    T* gk = zmax + kid * tile;
    for (int64_t t = 0; t < m; ++t) {
      const T passed = gp[t];  // loaded unconditionally, so the select is a blend, not a masked load
      gk[t] += wp[t] == kid ? passed : T(0);
    }
  }
  for (int64_t e = 0; e < tr.num_edges; ++e) {
    const int32_t kid = tr.edges[2 * e], par = tr.edges[2 * e + 1];
    const T* gk = zmin + kid * tile;
    const int32_t* kk = keep + kid * tile;
    T* gp = zmin + par * tile;
    for (int64_t t = 0; t < m; ++t) {
      const T passed = gk[t];
      gp[t] += kk[t] ? T(0) : passed;
    }
  }
  const bool with_ce = out.ce_grad_scale != nullptr;
  for (int64_t v = 0; v < N; ++v) {
    const T* a = zmax + v * tile;
    const T* i = zmin + v * tile;
    const int32_t* w = via + v * tile;
    const int32_t* k = keep + v * tile;
    T* g = out.grad + base + v * P;
    const int32_t self = static_cast<int32_t>(v);  // int32 compare: no widening in the vector loop
    if (with_ce) {
      T* __restrict cg = s.ce_grad.data() + v * tile;
      for (int64_t t = 0; t < m; ++t) {
        const T down = a[t], up_ = i[t];
        g[t] = (w[t] == self ? down : T(0)) + (k[t] ? up_ : T(0)) + cg[t];
        cg[t] = T(0);  // ready for the next tile
      }
    } else {
      for (int64_t t = 0; t < m; ++t) {
        const T down = a[t], up_ = i[t];
        g[t] = (w[t] == self ? down : T(0)) + (k[t] ? up_ : T(0));
      }
    }
  }
}

template <typename T, int FOCAL>
static void run_items(const T* x, const int64_t* lc, int64_t P, int64_t tile, int64_t tiles_per_image,
                      int64_t first, int64_t last, const Tree& tr, T gamma, const Outputs<T>& out) {
  Scratch<T> s(tr, tile, out.channel_sums != nullptr, out.ce_sums != nullptr, out.ce_grad_scale != nullptr);
  const bool sums = out.channel_sums || out.ce_sums;
  for (int64_t item = first; item < last; ++item) {
    const int64_t b = item / tiles_per_image;
    const int64_t p0 = (item % tiles_per_image) * tile;
    tile_pass<T, FOCAL>(x, lc, b, p0, std::min(tile, P - p0), P, tr, gamma, out, s, tile);
    if (sums && ++s.pending == kFlushTiles) s.flush();
  }
  if (sums) s.flush();
  if (out.channel_sums) {
    for (int64_t v = 0; v < tr.num_nodes; ++v) {
      double total = 0.0;
      for (int64_t t = 0; t < tile; ++t) total += s.sums[v * tile + t];
      out.channel_sums[v] += total;
    }
  }
  if (out.ce_sums) {
    for (int64_t d = 0; d < tr.num_depths; ++d) {
      double total = 0.0;
      for (int64_t t = 0; t < tile; ++t) total += s.ce_totals[d * tile + t];
      out.ce_sums[d] += total;
    }
  }
}

template <typename T>
static void run(const T* x, const int64_t* lc, int64_t P, int64_t tile, int64_t tiles_per_image, int64_t first,
                int64_t last, const Tree& tr, double gamma, const Outputs<T>& out) {
  if (gamma == 0.0) {
    run_items<T, 0>(x, lc, P, tile, tiles_per_image, first, last, tr, T(0), out);
  } else if (gamma == 2.0) {
    run_items<T, 2>(x, lc, P, tile, tiles_per_image, first, last, tr, T(2), out);
  } else {
    run_items<T, 1>(x, lc, P, tile, tiles_per_image, first, last, tr, static_cast<T>(gamma), out);
  }
}

}  // namespace HIERALOSS_ISA
