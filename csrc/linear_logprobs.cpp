// Native CPU backend of the fused LM-head log-prob op (kernel contract: epa_kernels/ops/torch_logprobs.py).
//
// Blocked algorithm: the vocabulary is walked in tiles (outer loop) and the tokens in blocks (inner loop).
// Each [tokens x vocab] tile of fp32 logits is produced by one ATen GEMM into a small reusable workspace,
// then consumed by one fused vectorised pass over its rows:
//   forward:  online logsumexp across vocab tiles (running max, rescaled sum of e^{z-m}, the target logit
//             and, for entropy, the rescaled sum of e^{z-m}·z);
//   backward: dz = p·(b + c·z) + a·onehot chained through softcap and temperature, written in place, and
//             then fed to the GEMMs d_hidden[t0:t1] += dz·W[v0:v1] and d_weight[v0:v1] += dzᵀ·h[t0:t1]
//             (with filter_eps > 0, the entries whose p < filter_eps are dropped, see SparseTile).
// Logits therefore never exist beyond one tile, so the extra memory is the tile plus fp32 staging copies
// for reduced-precision inputs. Vocab-outer order lets a reduced-precision weight tile be upcast once and
// lets d_weight[v0:v1] be finished (and downcast) while it is hot.

// The extension is built with -march=native but without ATen's per-kernel CPU_CAPABILITY defines, which would
// leave at::vec::Vectorized on its scalar fallback. Selecting the matching ISA here gives real SIMD and the
// Sleef exp/tanh (1-ulp) that libtorch_cpu exports.
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// fp32 logits one tile may hold (8 MiB). Measured on 2 cores at M=4096, D=512: 4096 x 512 tiles run the GEMMs
// as fast as 16 MiB tiles and as fast as one whole-matrix GEMM, while staying small next to the gradients.
constexpr int64_t kTileElems = 2 * 1024 * 1024;
constexpr int64_t kMaxTokenBlock = 4096;

struct Tiling {
  int64_t tokens;  // rows per token block
  int64_t vocab;   // columns per vocab tile
};

Tiling choose_tiling(int64_t num_tokens, int64_t vocab) {
  const int64_t tokens = std::max<int64_t>(1, std::min(num_tokens, kMaxTokenBlock));
  int64_t cols = std::max<int64_t>(1, kTileElems / tokens);
  // Whole SIMD vectors per row except in the last tile.
  if (cols >= 64) cols -= cols % 64;
  return {tokens, std::min(vocab, cols)};
}

// Logit transform a -> z: bias, temperature, softcap (c·tanh(u/c)). Its options are runtime values but
// loop-invariant, so the branches are perfectly predicted and cost nothing next to exp.
struct Transform {
  const float* bias;  // fp32 bias of this vocab tile, or nullptr
  float inv_temp;
  float softcap;      // 0: none
  float inv_softcap;

  Vec apply(Vec x, int64_t col) const {
    if (bias) x = x + Vec::loadu(bias + col);
    if (inv_temp != 1.0f) x = x * Vec(inv_temp);
    if (softcap != 0.0f) x = (x * Vec(inv_softcap)).tanh() * Vec(softcap);
    return x;
  }
  Vec apply(Vec x, int64_t col, int64_t count) const {
    if (bias) x = x + Vec::loadu(bias + col, count);
    if (inv_temp != 1.0f) x = x * Vec(inv_temp);
    if (softcap != 0.0f) x = (x * Vec(inv_softcap)).tanh() * Vec(softcap);
    return x;
  }
  float apply(float x, int64_t col) const {
    if (bias) x += bias[col];
    if (inv_temp != 1.0f) x *= inv_temp;
    if (softcap != 0.0f) x = std::tanh(x * inv_softcap) * softcap;
    return x;
  }
  // dz/da for the logit z (post-transform).
  Vec chain(Vec z) const {
    Vec g(inv_temp);
    if (softcap != 0.0f) {
      const Vec r = z * Vec(inv_softcap);
      g = g * (Vec(1.0f) - r * r);
    }
    return g;
  }
  float chain(float z) const {
    float g = inv_temp;
    if (softcap != 0.0f) {
      const float r = z * inv_softcap;
      g *= 1.0f - r * r;
    }
    return g;
  }
};

Transform make_transform(const float* bias, double temperature, double softcap) {
  return {bias, static_cast<float>(1.0 / temperature), static_cast<float>(softcap),
          softcap != 0.0 ? static_cast<float>(1.0 / softcap) : 0.0f};
}

// Running per-token state of the online logsumexp over vocab tiles.
struct OnlineState {
  float* max;
  float* sum;     // Σ e^{z - max}
  float* zsum;    // Σ e^{z - max}·z (entropy only), or nullptr
  float* target;  // z[y]
};

// Folds one row of raw logits (columns [v0, v0+n)) into the state of its token. The row is 4-16 KiB, so the
// transform+max sweep and the exp sweep both run from L1; the transformed z is stored back for the second.
inline void forward_row(float* row, int64_t n, int64_t v0, int64_t y, const Transform& tf, OnlineState st,
                        int64_t t) {
  constexpr int64_t W = Vec::size();
  const int64_t full = n - n % W;
  Vec vmax(kNegInf);
  for (int64_t j = 0; j < full; j += W) {
    const Vec z = tf.apply(Vec::loadu(row + j), j);
    z.store(row + j);
    vmax = at::vec::maximum(vmax, z);
  }
  if (full < n) {
    const int64_t rem = n - full;
    const Vec z = tf.apply(Vec::loadu(row + full, rem), full, rem);
    z.store(row + full, rem);
    vmax = at::vec::maximum(vmax, Vec::set(Vec(kNegInf), z, rem));
  }
  const float tile_max = vmax.reduce_max();
  const float old_max = st.max[t];
  const float new_max = std::max(old_max, tile_max);
  // All logits so far -inf: keep the shift finite-free so exp(-inf - -inf) never yields NaN.
  const float shift = new_max == kNegInf ? 0.0f : new_max;
  const Vec vshift(shift);
  Vec vsum(0.0f), vzsum(0.0f);
  const bool entropy = st.zsum != nullptr;
  for (int64_t j = 0; j < full; j += W) {
    const Vec z = Vec::loadu(row + j);
    const Vec e = (z - vshift).exp();
    vsum = vsum + e;
    if (entropy) vzsum = at::vec::fmadd(e, z, vzsum);
  }
  if (full < n) {
    const int64_t rem = n - full;
    const Vec z = Vec::loadu(row + full, rem);
    const Vec e = Vec::set(Vec(0.0f), (z - vshift).exp(), rem);
    vsum = vsum + e;
    if (entropy) vzsum = vzsum + Vec::set(Vec(0.0f), e * z, rem);
  }
  const float scale = old_max == kNegInf ? 0.0f : std::exp(old_max - shift);
  st.sum[t] = st.sum[t] * scale + vsum.reduce_add();
  if (entropy) st.zsum[t] = st.zsum[t] * scale + vzsum.reduce_add();
  st.max[t] = new_max;
  if (y >= v0 && y < v0 + n) st.target[t] = row[y - v0];
}

// Gradient filtering (filter_eps > 0). On a trained model's peaked softmax almost every probability of a tile is tiny
// but the large ones are scattered: whole 128-column blocks below eps are rare, single entries below it are ~99%
// (SmolLM2 on dialogue). So the filter is per entry: the softmax part of dz is kept where p >= eps, as a sparse
// row applied by AXPYs, and each dropped entry is replaced by the mean row of the other operand, an exact identity
// up to a small residual:
//   Σ_j dz_j W_j = Σ_kept dz_j W_j + (Σ_dropped dz_j)·W̄ + Σ_dropped dz_j (W_j − W̄),
// the last sum being what is dropped; each dropped |dz_j| = p_j·|b + c·z_j|·chain is below eps times the row's
// coefficient |b + c·z_j|·chain. The dropped entries share the sign of that coefficient, so without the W̄ term their sum would push every row of d_hidden the
// same way. The criterion is on p, not on |dz|, so one eps suits any loss scale. A tile with too many kept entries
// for AXPYs to beat the GEMMs is applied exactly with the GEMMs instead.
constexpr double kMaxSparseFraction = 1.0 / 16;

struct Entry {
  int32_t col;
  float val;
};

// Kept entries of one tile, row by row in column order, per row the sum of the dropped ones, and per thread the
// column sums of whole rows (reduced by `column_sums`).
struct SparseTile {
  std::vector<std::vector<Entry>> rows;
  std::vector<float> dropped;
  at::Tensor col_acc;  // [threads, max cols]

  SparseTile(int64_t max_rows, int64_t max_cols)
      : rows(max_rows), dropped(max_rows), col_acc(at::empty({at::get_num_threads(), max_cols}, at::kFloat)) {}

  void start(int64_t nv) { col_acc.narrow(1, 0, nv).zero_(); }

  // The sink of row r for backward_row, writing into this thread's column sums.
  struct Row {
    std::vector<Entry>& kept;
    float* col_sums;
    float eps;
    Vec total = Vec(0.0f);
    float kept_sum = 0.0f;

    // Columns [c, c + count) with probabilities p and gradients dz (lanes past count are zero).
    void take(int64_t c, Vec p, Vec dz, int64_t count) {
      total = total + dz;
      (Vec::loadu(col_sums + c, count) + dz).store(col_sums + c, count);
      // zero_mask has a bit per lane equal to 0; the comparison sets every bit of a lane that passes
      if (Vec(p >= Vec(eps)).zero_mask() == (1 << Vec::size()) - 1) return;
      float ps[Vec::size()], dzs[Vec::size()];
      p.store(ps);
      dz.store(dzs);
      for (int64_t l = 0; l < count; ++l) {
        if (ps[l] >= eps) {
          kept.push_back({static_cast<int32_t>(c + l), dzs[l]});
          kept_sum += dzs[l];
        }
      }
    }
    float dropped() const { return total.reduce_add() - kept_sum; }
  };

  Row row(int64_t r, float eps) {
    rows[r].clear();
    return {rows[r], col_acc.data_ptr<float>() + at::get_thread_num() * col_acc.size(1), eps};
  }

  // Σ over threads of the column sums: [nv].
  at::Tensor column_sums(int64_t nv) const { return col_acc.narrow(1, 0, nv).sum(0); }

  // dh[r] += Σ_kept val·w[col] for the tile's rows (rows are independent: parallel over them).
  void apply_hidden(int64_t nt, const float* w, int64_t D, float* dh) const {
    at::parallel_for(0, nt, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (const Entry& e : rows[r]) axpy(e.val, w + e.col * D, dh + r * D, D);
      }
    });
  }

  // dw[col] += Σ_kept val·h[r] and col_dropped[col] −= Σ_kept val (columns are independent: parallel over them).
  void apply_weight(int64_t nt, int64_t nv, const float* h, int64_t D, float* dw, float* col_dropped) const {
    at::parallel_for(0, nv, 64, [&](int64_t c0, int64_t c1) {
      auto before = [](const Entry& e, int64_t c) { return e.col < c; };
      for (int64_t r = 0; r < nt; ++r) {
        const std::vector<Entry>& row = rows[r];
        for (auto e = std::lower_bound(row.begin(), row.end(), c0, before); e != row.end() && e->col < c1; ++e) {
          axpy(e->val, h + r * D, dw + e->col * D, D);
          col_dropped[e->col] -= e->val;
        }
      }
    });
  }

  static void axpy(float a, const float* x, float* y, int64_t n) {
    constexpr int64_t W = Vec::size();
    const Vec va(a);
    int64_t i = 0;
    for (; i + W <= n; i += W) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
    for (; i < n; ++i) y[i] += a * x[i];
  }
};

// Overwrites one row of raw logits with d loss / d raw logit for token t. With `target_coef` (filtering), the
// target's one-hot term a·chain is stored there instead of added to the row (it is applied apart, exactly); a
// `sink` receives the row's probabilities and gradients.
inline void backward_row(float* row, int64_t n, int64_t v0, int64_t y, const Transform& tf, float lse,
                         float a, float b, const float* c, float* target_coef, SparseTile::Row* sink) {
  constexpr int64_t W = Vec::size();
  const int64_t full = n - n % W;
  const bool on_target = y >= v0 && y < v0 + n;
  const float raw_target = on_target ? row[y - v0] : 0.0f;
  const Vec vlse(lse), vb(b);
  const bool trivial_chain = tf.inv_temp == 1.0f && tf.softcap == 0.0f;
  auto grad = [&](Vec z, Vec p) {
    Vec dz = c ? p * at::vec::fmadd(Vec(*c), z, vb) : p * vb;
    return trivial_chain ? dz : dz * tf.chain(z);
  };
  for (int64_t j = 0; j < full; j += W) {
    const Vec z = tf.apply(Vec::loadu(row + j), j);
    const Vec p = (z - vlse).exp();
    const Vec dz = grad(z, p);
    dz.store(row + j);
    if (sink) sink->take(j, p, dz, W);
  }
  if (full < n) {
    const int64_t rem = n - full;
    const Vec z = tf.apply(Vec::loadu(row + full, rem), full, rem);
    const Vec p = Vec::set(Vec(0.0f), (z - vlse).exp(), rem);
    const Vec dz = Vec::set(Vec(0.0f), grad(z, p), rem);
    dz.store(row + full, rem);
    if (sink) sink->take(full, p, dz, rem);
  }
  if (on_target) {
    const float term = a * tf.chain(tf.apply(raw_target, y - v0));
    if (target_coef) {
      *target_coef = term;
    } else {
      row[y - v0] += term;
    }
  }
}

// Contiguous [rows, cols] view of the first rows·cols elements of the workspace.
at::Tensor tile_view(const at::Tensor& ws, int64_t rows, int64_t cols) {
  return ws.narrow(0, 0, rows * cols).view({rows, cols});
}

at::Tensor as_fp32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "native backend: CPU tensors only");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "native backend: hidden [M, D] and weight [V, D] expected");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "native backend: contiguous inputs expected");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "native backend: hidden/weight dtype mismatch");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.numel() == hidden.size(0),
              "native backend: targets [M] int64 expected");
  if (bias) TORCH_CHECK(bias->numel() == weight.size(0), "native backend: bias [V] expected");
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, double softcap, bool with_entropy) {
  at::NoGradGuard no_grad;  // out= GEMMs refuse inputs that require grad while grad mode is on
  check_inputs(hidden, weight, bias, targets);
  const int64_t M = hidden.size(0), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({M}, f32), lse = at::empty({M}, f32);
  c10::optional<at::Tensor> ez;
  if (with_entropy) ez = at::empty({M}, f32);
  if (M == 0) return {logp, lse, ez};

  const at::Tensor h32 = as_fp32(hidden);  // upcast once; the GEMMs run in fp32 so the logits are fp32
  const at::Tensor targets_c = targets.contiguous();
  const at::Tensor bias32 = bias ? as_fp32(bias->contiguous()) : at::Tensor();
  at::Tensor run_max = at::full({M}, kNegInf, f32), run_sum = at::zeros({M}, f32);
  at::Tensor run_zsum = with_entropy ? at::zeros({M}, f32) : at::Tensor();
  const Tiling tiling = choose_tiling(M, V);
  at::Tensor ws = at::empty({tiling.tokens * tiling.vocab}, f32);

  const int64_t* y = targets_c.data_ptr<int64_t>();
  OnlineState st{run_max.data_ptr<float>(), run_sum.data_ptr<float>(),
                 with_entropy ? run_zsum.data_ptr<float>() : nullptr, logp.data_ptr<float>()};

  for (int64_t v0 = 0; v0 < V; v0 += tiling.vocab) {
    const int64_t nv = std::min(tiling.vocab, V - v0);
    const at::Tensor w32 = as_fp32(weight.narrow(0, v0, nv));
    const Transform tf = make_transform(bias ? bias32.data_ptr<float>() + v0 : nullptr, temperature, softcap);
    for (int64_t t0 = 0; t0 < M; t0 += tiling.tokens) {
      const int64_t nt = std::min(tiling.tokens, M - t0);
      at::Tensor tile = tile_view(ws, nt, nv);
      at::mm_out(tile, h32.narrow(0, t0, nt), w32.t());
      float* base = tile.data_ptr<float>();
      at::parallel_for(0, nt, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) forward_row(base + r * nv, nv, v0, y[t0 + r], tf, st, t0 + r);
      });
    }
  }

  // lse = max + log Σ e^{z-max}; logp = z[y] − lse; ez = Σ e^{z-max}·z / Σ e^{z-max}.
  float* lse_p = lse.data_ptr<float>();
  float* logp_p = logp.data_ptr<float>();
  float* ez_p = with_entropy ? ez->data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < M; ++t) {
    const float m = st.max[t];
    const float l = m == kNegInf ? kNegInf : m + std::log(st.sum[t]);
    lse_p[t] = l;
    logp_p[t] = st.target[t] - l;
    if (ez_p) ez_p[t] = st.zsum[t] / st.sum[t];
  }
  return {logp, lse, ez};
}

std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>> backward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& coef_a, const at::Tensor& coef_b,
    const c10::optional<at::Tensor>& coef_c, double temperature, double softcap, bool need_hidden,
    bool need_weight, bool need_bias, double filter_eps) {
  at::NoGradGuard no_grad;
  check_inputs(hidden, weight, bias, targets);
  need_bias = need_bias && bias.has_value();
  const int64_t M = hidden.size(0), V = weight.size(0), D = hidden.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool fp32_in = hidden.scalar_type() == at::kFloat;

  c10::optional<at::Tensor> d_hidden, d_weight, d_bias;
  // fp32 accumulators, each first written by a beta = 0 GEMM. For fp32 inputs they are the outputs themselves
  // (no extra copy); otherwise d_hidden is accumulated over all vocab tiles in fp32, and d_weight only needs
  // one fp32 tile at a time because the vocab tile is the outer loop.
  at::Tensor dh32, dw32_tile, db32;
  const bool filtering = filter_eps > 0.0;
  if (need_hidden) {
    d_hidden = at::empty({M, D}, hidden.options());
    dh32 = fp32_in ? *d_hidden : at::empty({M, D}, f32);
    if (filtering) dh32.zero_();
  }
  if (need_weight) d_weight = at::empty({V, D}, weight.options());
  if (need_bias) db32 = at::zeros({V}, f32);
  if (M == 0 || !(need_hidden || need_weight || need_bias)) {
    if (need_weight) d_weight->zero_();
    if (need_hidden) d_hidden->zero_();
    if (need_bias) d_bias = db32.to(bias->scalar_type());
    return {d_hidden, d_weight, d_bias};
  }

  const at::Tensor h32 = as_fp32(hidden);
  const at::Tensor targets_c = targets.contiguous();
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  const at::Tensor a_c = coef_a.to(at::kFloat).contiguous(), b_c = coef_b.to(at::kFloat).contiguous();
  const at::Tensor c_c = coef_c ? coef_c->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor bias32 = bias ? as_fp32(bias->contiguous()) : at::Tensor();
  const Tiling tiling = choose_tiling(M, V);
  at::Tensor ws = at::empty({tiling.tokens * tiling.vocab}, f32);
  if (need_weight && !fp32_in) dw32_tile = at::empty({tiling.vocab, D}, f32);

  // Filtering: every token's one-hot term a·chain (applied sparsely, so that the softmax part alone decides what
  // is negligible), each row's dropped sum (times W̄ into d_hidden) and the mean rows W̄ and H̄.
  const float eps = static_cast<float>(filter_eps);
  at::Tensor target_coef, row_dropped, w_mean, h_mean;
  std::unique_ptr<SparseTile> sparse;
  if (filtering) {
    target_coef = at::zeros({M}, f32);
    row_dropped = at::zeros({M}, f32);
    w_mean = at::mean(weight, {0}, false, at::kFloat);
    h_mean = h32.mean(0);
    sparse = std::make_unique<SparseTile>(tiling.tokens, tiling.vocab);
  }
  float* target_p = filtering ? target_coef.data_ptr<float>() : nullptr;
  const int64_t* y = targets_c.data_ptr<int64_t>();
  const float* lse_p = lse_c.data_ptr<float>();
  const float* a_p = a_c.data_ptr<float>();
  const float* b_p = b_c.data_ptr<float>();
  const float* c_p = coef_c ? c_c.data_ptr<float>() : nullptr;

  for (int64_t v0 = 0; v0 < V; v0 += tiling.vocab) {
    const int64_t nv = std::min(tiling.vocab, V - v0);
    const at::Tensor w32 = as_fp32(weight.narrow(0, v0, nv));
    const Transform tf = make_transform(bias ? bias32.data_ptr<float>() + v0 : nullptr, temperature, softcap);
    at::Tensor dw_acc;
    if (need_weight) {
      dw_acc = fp32_in ? d_weight->narrow(0, v0, nv) : dw32_tile.narrow(0, 0, nv);
      if (filtering) dw_acc.zero_();
    }
    const at::Tensor col_dropped = filtering ? at::zeros({nv}, f32) : at::Tensor();  // per column, for H̄
    for (int64_t t0 = 0; t0 < M; t0 += tiling.tokens) {
      const int64_t nt = std::min(tiling.tokens, M - t0);
      at::Tensor tile = tile_view(ws, nt, nv);
      const at::Tensor h_blk = h32.narrow(0, t0, nt);
      at::mm_out(tile, h_blk, w32.t());
      float* base = tile.data_ptr<float>();
      if (filtering) sparse->start(nv);
      // Once a tile keeps too many entries for sparse updates it goes to the GEMMs: stop collecting.
      const int64_t max_kept = static_cast<int64_t>(kMaxSparseFraction * static_cast<double>(nt * nv));
      std::atomic<int64_t> kept{0};
      at::parallel_for(0, nt, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t t = t0 + r;
          float* row = base + r * nv;
          if (!filtering || kept.load(std::memory_order_relaxed) > max_kept) {
            backward_row(row, nv, v0, y[t], tf, lse_p[t], a_p[t], b_p[t], c_p ? c_p + t : nullptr,
                         filtering ? target_p + t : nullptr, nullptr);
            continue;
          }
          SparseTile::Row sink = sparse->row(r, eps);
          backward_row(row, nv, v0, y[t], tf, lse_p[t], a_p[t], b_p[t], c_p ? c_p + t : nullptr, target_p + t,
                       &sink);
          sparse->dropped[r] = sink.dropped();
          kept += static_cast<int64_t>(sparse->rows[r].size());
        }
      });
      const bool sparse_tile = filtering && kept.load() <= max_kept;
      const at::Tensor col_sums = sparse_tile ? sparse->column_sums(nv) : need_bias ? tile.sum(0) : at::Tensor();
      if (need_bias) db32.narrow(0, v0, nv).add_(col_sums);
      if (sparse_tile) {
        if (need_hidden) sparse->apply_hidden(nt, w32.data_ptr<float>(), D, dh32.data_ptr<float>() + t0 * D);
        if (need_weight) {
          col_dropped.add_(col_sums);
          sparse->apply_weight(nt, nv, h_blk.data_ptr<float>(), D, dw_acc.data_ptr<float>(),
                               col_dropped.data_ptr<float>());
        }
        row_dropped.narrow(0, t0, nt).add_(at::from_blob(sparse->dropped.data(), {nt}, f32));
        continue;
      }
      // Dense: the first contribution overwrites (beta = 0) and later ones accumulate (beta = 1); filtered, the
      // accumulators start at zero because sparse tiles may come first.
      if (need_hidden) {
        at::Tensor dh_blk = dh32.narrow(0, t0, nt);
        if (v0 == 0 && !filtering) {
          at::mm_out(dh_blk, tile, w32);
        } else {
          dh_blk.addmm_(tile, w32);
        }
      }
      if (need_weight) {
        if (t0 == 0 && !filtering) {
          at::mm_out(dw_acc, tile.t(), h_blk);
        } else {
          dw_acc.addmm_(tile.t(), h_blk);
        }
      }
    }
    if (filtering && (need_weight || need_bias)) {  // the one-hot terms of the tokens whose target is here
      const at::Tensor here = ((targets_c >= v0) & (targets_c < v0 + nv)).nonzero().squeeze(1);
      const at::Tensor rows = targets_c.index_select(0, here) - v0;
      const at::Tensor coef = target_coef.index_select(0, here);
      if (need_weight) dw_acc.index_add_(0, rows, h32.index_select(0, here) * coef.unsqueeze(1));
      if (need_bias) db32.narrow(0, v0, nv).index_add_(0, rows, coef);
    }
    if (filtering && need_weight) dw_acc.addr_(col_dropped, h_mean);
    if (need_weight && !fp32_in) d_weight->narrow(0, v0, nv).copy_(dw_acc);
  }

  if (filtering && need_hidden) {
    dh32.add_(as_fp32(weight.index_select(0, targets_c)) * target_coef.unsqueeze(1));
    dh32.addr_(row_dropped, w_mean);
  }
  if (need_hidden && !fp32_in) d_hidden->copy_(dh32);
  if (need_bias) d_bias = db32.to(bias->scalar_type());
  return {d_hidden, d_weight, d_bias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released: the ops are long and touch no Python state.
  m.doc() = "Native CPU backend of epa_kernels.linear_logprobs (blocked GEMM tiles + fused vectorised passes)";
  m.def("forward", &forward,
        "forward(hidden, weight, bias, targets, temperature, softcap, with_entropy) -> (logp, lse, ez|None); "
        "softcap 0 means none",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("temperature"),
        py::arg("softcap"), py::arg("with_entropy"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward,
        "backward(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, temperature, softcap, "
        "need_hidden, need_weight, need_bias, filter_eps) -> (d_hidden|None, d_weight|None, d_bias|None); "
        "softcap 0 means none, filter_eps 0 an exact gradient",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("lse"),
        py::arg("coef_a"), py::arg("coef_b"), py::arg("coef_c"), py::arg("temperature"), py::arg("softcap"),
        py::arg("need_hidden"), py::arg("need_weight"), py::arg("need_bias"), py::arg("filter_eps"),
        py::call_guard<py::gil_scoped_release>());
}
