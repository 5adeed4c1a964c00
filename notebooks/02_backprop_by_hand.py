# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Backprop by hand
#
# Deep-learning frameworks record every operation on a tape and differentiate it for you. refimpl
# has no tape. Each operation is a pair of functions: a `*_forward` that returns its output and a
# small named cache, and a `*_backward` that takes the gradient arriving from above and returns
# the gradients of the inputs. This chapter writes out that pair for every primitive a
# DeepSeek-V3 block is made of, derives each backward pass on paper, puts the derivation beside
# the code that implements it, and then tests the two against each other numerically.
#
# Why do it by hand, when autograd exists?
#
# * **It is what kernels do.** A fused Triton or CUDA kernel has no autograd inside it: the people
#   who write fused cross-entropy or RMSNorm kernels derive the backward pass and code it directly
#   {cite}`hsu2024liger`. A float64 reference that exposes each gradient as a plain function is the
#   oracle such a kernel is tested against.
# * **The cache is the memory bill.** Whatever a forward pass stores for its backward pass is
#   activation memory. Writing the cache as an explicit `NamedTuple` shows what every layer
#   keeps alive during training, and what could be recomputed instead.
# * **A derivation is an explanation.** Most of the numerical care in these models (subtracting
#   the row maximum in a softmax, never forming the log-probabilities of a 129 280-word vocabulary,
#   keeping the sigmoid from overflowing) becomes obvious once you write out the gradient.
#
# The price of doing it by hand is that every backward pass can be wrong in a way that still runs.
# So the first tool is a checker, and every gradient below goes through it.
#
# Notation follows {doc}`../notation`: `dx` in code is $\bar x = \partial L / \partial x$ for some
# scalar loss $L$, and $\bar y$ is the gradient arriving at an op from above.

# %% [markdown]
# ```{admonition} After this chapter you can
# :class: tip
# * derive the backward pass of each primitive of a DeepSeek block (linear, embedding, RMSNorm,
#   SwiGLU, softmax, cross-entropy, RoPE) and write it as a function;
# * check any backward pass against central finite differences, and tell a right gradient from a
#   wrong one by the size of its error;
# * explain how RoPE turns absolute positions into relative ones, and how YaRN stretches it to long
#   contexts.
# ```

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from refimpl import ModelConfig
from refimpl.core import (
    cross_entropy,
    embedding_backward,
    embedding_forward,
    linear_backward,
    linear_forward,
    log_softmax_backward,
    log_softmax_forward,
    logsumexp_backward,
    logsumexp_forward,
    rmsnorm_backward,
    rmsnorm_forward,
    rope_attention_factor,
    rope_backward,
    rope_forward,
    rope_inv_freq,
    sigmoid,
    silu_backward,
    silu_forward,
    softmax_backward,
    softmax_forward,
    softmax_scale,
    swiglu_backward,
    swiglu_forward,
    swiglu_mlp_backward,
    swiglu_mlp_forward,
    yarn_correction_range,
    yarn_mscale,
)
from refimpl.core.softmax import SoftmaxCache
from refimpl.display import show_source
from refimpl.testing import check_grad, tol

t_start = time.perf_counter()
rng = np.random.default_rng(0)
GRAD_TOL = tol("gradcheck")["rtol"]   # 1e-6: the project's one tolerance for gradient checks
grad_errors = {}                      # primitive -> worst relative error, for the summary figure
bug_errors = {}                       # deliberately wrong backward passes -> their error


def record(name, err):
    """Print a gradient check's worst relative error and assert it is within tolerance."""
    grad_errors[name] = err
    print(f"{name:<34s} worst relative error {err:.1e}  (tolerance {GRAD_TOL:.0e})")
    assert err < GRAD_TOL, f"{name}: gradient check failed with relative error {err:.2e}"


# %% [markdown]
# ## The gradient checker
#
# A backward pass computes a vector-Jacobian product: given $\bar y$, it returns
# $\bar x = J^\top \bar y$, where $J = \partial y / \partial x$. We never need $J$ itself, because
# $\bar x$ is the gradient of one scalar, $\phi(x) = \langle \bar y, f(x) \rangle$:
#
# $$
# \bar x_k = \frac{\partial \phi}{\partial x_k}
#          \approx \frac{\phi(x + \epsilon e_k) - \phi(x - \epsilon e_k)}{2\epsilon}.
# $$ (eq-central-difference)
#
# `refimpl.testing.check_grad` evaluates this central difference for (a random sample of) the
# entries of every input, in float64 with $\epsilon = 10^{-6}$, and reports the worst relative
# error against the analytic gradient. The truncation error of a central difference is
# $O(\epsilon^2) \approx 10^{-12}$ and the rounding error about $10^{-16}/\epsilon = 10^{-10}$, so
# a correct backward pass lands far below the tolerance of $10^{-6}$, and a wrong one lands far
# above it.
#
# One detail matters more than it looks: $\bar y$ is **random**. With $\bar y = \mathbf 1$ (the
# gradient of `y.sum()`), a backward pass that forgets a term summing to zero over the outputs
# (softmax and RMSNorm both have one) would still pass.
#
# `check_grad(f, inputs)` wants `f(*inputs)` to return the output and a function `vjp(dy)` that
# returns one gradient per input. Pairing a forward with its backward is a two-line closure, as
# the next cells show. The checker's own source:

# %% tags=["hide-output"]
show_source(check_grad)

# %% [markdown]
# ## Linear layers and embeddings
#
# Every projection in the model (the MLA down- and up-projections, the experts, the router, the
# output head) is a linear map in the PyTorch convention, with weights stored `[out, in]`:
#
# $$
# y = x W^\top + b, \qquad y_{nj} = \sum_k x_{nk} W_{jk} + b_j .
# $$
#
# Differentiating one entry at a time, $\partial y_{nj} / \partial x_{nk} = W_{jk}$ and
# $\partial y_{nj} / \partial W_{jk} = x_{nk}$, so summing over what each input touches:
#
# $$
# \bar x = \bar y\, W, \qquad \bar W = \bar y^\top x, \qquad \bar b = \textstyle\sum_n \bar y_n ,
# $$ (eq-linear-backward)
#
# where $n$ runs over all leading axes flattened into rows. The backward pass of one matrix product
# is two matrix products of the same size, which is where the rule of thumb "training costs three
# times the forward pass" comes from.

# %%
show_source(linear_forward, linear_backward, checks=False)


# %%
def linear(x, w, b):
    y, cache = linear_forward(x, w, b)
    return y, lambda dy: linear_backward(dy, cache)   # (dx, dw, db): one gradient per input


x = rng.standard_normal((2, 3, 5))     # (B, T, Din)
w = rng.standard_normal((4, 5))        # (Dout, Din)
b = rng.standard_normal(4)             # (Dout,)
record("linear", check_grad(linear, [x, w, b]))

# float32 in, float32 out: dtype is preserved on both passes
y32, c32 = linear_forward(x.astype(np.float32), w.astype(np.float32))
assert y32.dtype == np.float32 and linear_backward(np.ones_like(y32), c32)[1].dtype == np.float32

# %% [markdown]
# An embedding is a table lookup, $y_t = W_{\mathrm{id}_t}$. Its gradient sends each row of
# $\bar y$ back to the table row it came from, and **adds** when a token occurs twice:
# $\bar W_v = \sum_{t:\ \mathrm{id}_t = v} \bar y_t$. In NumPy that is `np.add.at`. The tempting
# `dw[ids] += dy` is a classic bug: with repeated ids, fancy-index assignment keeps only the last
# write.

# %%
show_source(embedding_backward)

# %%
ids = np.array([[3, 1, 3], [0, 3, 2]])               # (B, T) int64; token 3 appears three times
table = rng.standard_normal((5, 4))                  # (V, D)
emb, emb_cache = embedding_forward(ids, table)       # (B, T, D)
dy = rng.standard_normal(emb.shape)                  # (B, T, D)
dtable = embedding_backward(dy, emb_cache)           # (V, D)
np.testing.assert_allclose(dtable[3], dy[0, 0] + dy[0, 2] + dy[1, 1])   # three rows summed

buggy = np.zeros_like(table)
buggy[ids] += dy                                     # the bug: repeated ids overwrite, not add
assert not np.allclose(buggy[3], dtable[3])


def embedding(ids, w):
    y, cache = embedding_forward(ids, w)
    return y, lambda dy: (None, embedding_backward(dy, cache))   # no gradient for integer ids


record("embedding", check_grad(embedding, [ids, table]))

# %% [markdown]
# ## RMSNorm
#
# DeepSeek-V2 and V3 normalise with RMSNorm {cite}`zhang2019rmsnorm` before attention, before the
# FFN, after the last block and on MLA's two compressed latents. For one row $x \in \mathbb R^D$:
#
# $$
# r = \Bigl(\tfrac1D \textstyle\sum_j x_j^2 + \epsilon\Bigr)^{-1/2}, \qquad
# \hat x = r\,x, \qquad y = w \odot \hat x .
# $$ (eq-rmsnorm)
#
# The gain is easy: $\bar w = \sum_{\text{rows}} \bar y \odot \hat x$. For the input, write
# $g = \bar y \odot w$ (the gradient arriving at $\hat x$). Every $x_k$ reaches the output twice,
# directly and through $r$, with $\partial r / \partial x_k = -r^3 x_k / D$:
#
# $$
# \bar x_k = r\, g_k + \sum_j g_j x_j \frac{\partial r}{\partial x_k}
#          = r\Bigl(g_k - \hat x_k \cdot \tfrac1D \textstyle\sum_j g_j \hat x_j\Bigr).
# $$ (eq-rmsnorm-backward)
#
# The second term is the one a hurried derivation forgets. It removes from $g$ its component
# along $\hat x$: taking the dot product of $\bar x$ with $x$ and using
# $r^2 \tfrac1D\sum_j x_j^2 = 1 - \epsilon r^2$ gives
#
# $$
# \langle \bar x, x \rangle = \epsilon\, r^3 \langle g, x \rangle ,
# $$
#
# which vanishes as $\epsilon \to 0$. Scaling $x$ does not change $y$, so the gradient has
# (almost) nothing to say about the scale of $x$. The cell after the source checks that identity
# to machine precision.

# %%
show_source(rmsnorm_forward, rmsnorm_backward, checks=False)

# %%
eps = 1e-6
x = rng.standard_normal((3, 4, 16))    # (B, T, D)
w = 1.0 + 0.1 * rng.standard_normal(16)   # (D,)


def rmsnorm(x, w):
    y, cache = rmsnorm_forward(x, w, eps)
    return y, lambda dy: rmsnorm_backward(dy, cache)   # (dx, dw)


record("rmsnorm", check_grad(rmsnorm, [x, w]))

# the derived identity <dx, x> = eps * r^3 * <g, x>: the gradient is (almost) orthogonal to x
y, cache = rmsnorm_forward(x, w, eps)
dy = rng.standard_normal(y.shape)                                  # (B, T, D)
dx, dw = rmsnorm_backward(dy, cache)                               # (B, T, D), (D,)
lhs = np.sum(dx * x, axis=-1)                                      # (B, T)
rhs = eps * cache.rstd[..., 0] ** 3 * np.sum(dy * w * x, axis=-1)  # (B, T)
np.testing.assert_allclose(lhs, rhs, rtol=1e-6, atol=1e-15)
cosine = lhs / (np.linalg.norm(dx, axis=-1) * np.linalg.norm(x, axis=-1))
print(f"largest |cos(dx, x)| over rows: {np.abs(cosine).max():.1e}")
assert np.abs(cosine).max() < 1e-5

# %% [markdown]
# ### A wrong gradient is caught
#
# Suppose the derivation above had treated $r$ as a constant, as if it did not depend on $x$. The
# backward pass would still run, return arrays of the right shapes and even the right gain
# gradient. Only the checker notices:

# %%
def rmsnorm_bug_r_constant(x, w):
    y, cache = rmsnorm_forward(x, w, eps)
    xhat = cache.x * cache.rstd
    # deliberately wrong: drops the term that flows through r = (mean(x^2) + eps)^(-1/2)
    return y, lambda dy: (dy * cache.w * cache.rstd, np.sum(dy * xhat, axis=(0, 1)))


err = check_grad(rmsnorm_bug_r_constant, [x, w])
bug_errors["rmsnorm, r held constant"] = err
print(f"rmsnorm with r held constant: worst relative error {err:.2f}")
assert err > 1e-2

# %% [markdown]
# ## SiLU and SwiGLU
#
# Every dense FFN and every expert in DeepSeek-V2/V3 is a SwiGLU network {cite}`shazeer2020glu`:
# a SiLU-gated product of two projections, projected back down,
#
# $$
# \mathrm{FFN}(x) = \bigl(\operatorname{silu}(x W_1^\top) \odot x W_3^\top\bigr) W_2^\top,
# \qquad \operatorname{silu}(g) = g\,\sigma(g),
# $$ (eq-swiglu)
#
# with $W_1, W_3, W_2$ stored as `gate_proj`, `up_proj`, `down_proj`. Since
# $\sigma' = \sigma(1 - \sigma)$,
#
# $$
# \operatorname{silu}'(g) = \sigma(g)\bigl(1 + g\,(1 - \sigma(g))\bigr),
# $$
#
# and for $h = \operatorname{silu}(g) \odot u$ the product rule gives
# $\bar u = \bar h \odot \operatorname{silu}(g)$ and
# $\bar g = \bar h \odot u \odot \operatorname{silu}'(g)$. In the full FFN, $x$ feeds both the gate
# and the up projection, so its gradient is the **sum** of the two branches' gradients: whenever a
# value fans out in the forward pass, gradients add in the backward pass.
#
# The sigmoid itself is computed as $\tfrac12(1 + \tanh(x/2))$, which never overflows:
# `np.exp(-x)` for $x = -10^4$ would.

# %%
show_source(sigmoid, silu_forward, silu_backward, swiglu_forward, swiglu_backward, checks=False)

# %%
show_source(swiglu_mlp_forward, swiglu_mlp_backward, checks=False)


# %%
def silu(x):
    y, cache = silu_forward(x)
    return y, lambda dy: silu_backward(dy, cache)


def swiglu(gate, up):
    y, cache = swiglu_forward(gate, up)
    return y, lambda dy: swiglu_backward(dy, cache)   # (dgate, dup)


def swiglu_mlp(x, params):
    y, cache = swiglu_mlp_forward(x, params)
    return y, lambda dy: swiglu_mlp_backward(dy, cache)   # (dx, dparams) with the params' keys


D, I = 8, 12
params = {"gate_proj": rng.standard_normal((I, D)) / np.sqrt(D),   # (I, D)
          "up_proj": rng.standard_normal((I, D)) / np.sqrt(D),     # (I, D)
          "down_proj": rng.standard_normal((D, I)) / np.sqrt(I)}   # (D, I)
record("silu", check_grad(silu, [3 * rng.standard_normal((4, 7))]))
record("swiglu", check_grad(swiglu, [3 * rng.standard_normal((4, 7)), rng.standard_normal((4, 7))]))
record("swiglu_mlp (FFN / expert)", check_grad(swiglu_mlp, [rng.standard_normal((2, 3, D)), params]))

with np.errstate(all="raise"):          # no overflow warning anywhere, even at |x| = 1e4
    s = sigmoid(np.array([-1e4, 0.0, 1e4]))
assert s.tolist() == [0.0, 0.5, 1.0]

# %% [markdown]
# SiLU is not monotonic: it dips below zero before rising. Its minimum sits where
# $\operatorname{silu}'(g) = 0$, i.e. $1 + g(1 - \sigma(g)) = 0$, which rearranges to
# $g\,\sigma(g) = g + 1$: at its minimum, SiLU's value is its argument plus one. The plot uses
# `silu_backward` with $\bar y = 1$ for the derivative, and the cell checks that identity.

# %% tags=["hide-input"]
g = np.linspace(-6, 6, 1201)                           # (n,)
silu_g, silu_cache = silu_forward(g)                   # (n,)
dsilu = silu_backward(np.ones_like(g), silu_cache)     # (n,) = silu'(g)
k = np.argmin(silu_g)
sign_change = np.nonzero(np.diff(np.sign(dsilu)))[0]   # where silu' crosses zero: only at the minimum
assert len(sign_change) == 1 and abs(sign_change[0] - k) <= 1
fine = np.linspace(g[k] - 0.01, g[k] + 0.01, 20001)    # zoom in: spacing 1e-6
g_star = fine[np.argmin(silu_forward(fine)[0])]
silu_star = silu_forward(np.array([g_star]))[0][0]
assert abs(silu_star - (g_star + 1)) < 1e-5            # silu(g*) = g* + 1 at the minimum
print(f"minimum of silu at g* = {g_star:.5f}: silu(g*) = {silu_star:.5f} = g* + 1")

fig, ax = plt.subplots(figsize=(6.4, 3.4))
ax.plot(g, silu_g, label=r"$\mathrm{silu}(g) = g\,\sigma(g)$")
ax.plot(g, dsilu, label=r"$\mathrm{silu}'(g)$ from silu_backward")
ax.plot(g, np.maximum(g, 0), color="0.7", lw=1, ls="--", label="ReLU, for comparison")
ax.scatter([g_star], [silu_star], color="k", zorder=3)
ax.annotate(rf"minimum at $g^* \approx {g_star:.3f}$, value $g^*+1$", (g_star, silu_star),
            xytext=(-5.8, 1.6), arrowprops=dict(arrowstyle="->"))
ax.axhline(0, color="0.85", lw=0.8)
ax.set_xlabel("gate pre-activation $g$")
ax.legend(loc="upper left", fontsize=8, frameon=False)
ax.set_ylim(-0.6, 3.2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Softmax, log-softmax and log-sum-exp
#
# Attention weights, the V2 router, the policy log-probabilities of GRPO and the teacher and
# student distributions of distillation all pass through these three functions. With
# $p = \operatorname{softmax}(x)$ and $\partial p_i / \partial x_j = p_i(\delta_{ij} - p_j)$:
#
# $$
# \text{softmax:}\quad \bar x_j = p_j\Bigl(\bar p_j - \textstyle\sum_i p_i \bar p_i\Bigr), \qquad
# \text{log-softmax:}\quad \bar x_j = \bar\ell_j - p_j \textstyle\sum_i \bar\ell_i, \qquad
# \text{log-sum-exp:}\quad \bar x_j = \bar s\, p_j .
# $$ (eq-softmax-backward)
#
# The log-softmax line follows from $\ell_i = x_i - \operatorname{lse}(x)$ and
# $\partial \operatorname{lse} / \partial x_j = p_j$. Adding the same constant to every logit
# changes neither $p$ nor $\ell$, so the gradients of both must sum to zero along the softmax axis;
# the cells below check it. All three forward passes subtract the row maximum before
# exponentiating, so logits of size $10^4$ are harmless, and a row masked entirely with $-\infty$
# yields zeros instead of NaN.

# %%
show_source(softmax_forward, softmax_backward, log_softmax_forward, log_softmax_backward)

# %%
x = 3 * rng.standard_normal((4, 6))    # (N, V)


def softmax(x):
    p, cache = softmax_forward(x)
    return p, lambda dp: softmax_backward(dp, cache)


def log_softmax(x):
    logp, cache = log_softmax_forward(x)
    return logp, lambda dlogp: log_softmax_backward(dlogp, cache)


def logsumexp(x):
    s, cache = logsumexp_forward(x)
    return s, lambda ds: logsumexp_backward(ds, cache)


def softmax_axis0(x):                  # the reductions work along any axis
    p, cache = softmax_forward(x, axis=0)
    return p, lambda dp: softmax_backward(dp, cache)


record("softmax", check_grad(softmax, [x]))
record("softmax (axis=0)", check_grad(softmax_axis0, [x]))
record("log_softmax", check_grad(log_softmax, [x]))
record("logsumexp", check_grad(logsumexp, [x]))

# shift invariance => the gradients sum to zero along the softmax axis
_, c = softmax_forward(x)
_, cl = log_softmax_forward(x)
assert np.abs(softmax_backward(rng.standard_normal(x.shape), c).sum(axis=-1)).max() < 1e-14
assert np.abs(log_softmax_backward(rng.standard_normal(x.shape), cl).sum(axis=-1)).max() < 1e-14

# the gradient of log-sum-exp is the softmax
s, cs = logsumexp_forward(x)
np.testing.assert_allclose(logsumexp_backward(np.ones_like(s), cs), softmax_forward(x)[0], rtol=1e-14)

# extreme and masked rows: finite, with no overflow or invalid operation (exp(-2e4) underflowing
# to 0 is the intended result)
z = np.array([[1e4, -1e4, 0.0], [-np.inf, -np.inf, -np.inf]], dtype=np.float32)   # (2, 3)
with np.errstate(over="raise", invalid="raise"):
    p, _ = softmax_forward(z)
    lse, _ = logsumexp_forward(z)
print("softmax of [1e4, -1e4, 0] and of a fully masked row:\n", p)
print("log-sum-exp:", lse)
assert p.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
assert lse[0] == np.float32(1e4) and lse[1] == -np.inf

# %% [markdown]
# ### Wiring the wrong backward
#
# A second kind of bug needs no wrong algebra at all: pairing a forward pass with its neighbour's
# backward pass. Here log-softmax's forward is paired with softmax's backward (built from the same
# probabilities, so every shape matches):

# %%
def log_softmax_with_softmax_backward(x):
    logp, cache = log_softmax_forward(x)
    return logp, lambda dlogp: softmax_backward(dlogp, SoftmaxCache(cache.p, cache.axis))   # wrong


err = check_grad(log_softmax_with_softmax_backward, [x])
bug_errors["log_softmax with softmax's backward"] = err
print(f"log_softmax paired with softmax_backward: worst relative error {err:.2f}")
assert err > 1e-2

# %% [markdown]
# ## Cross-entropy
#
# Pre-training, supervised fine-tuning and the distillation of R1 into dense students all
# minimise next-token cross-entropy. For logits $z_t \in \mathbb R^V$ and target $y_t$:
#
# $$
# \ell_t = \operatorname{lse}(z_t) - z_{t, y_t}, \qquad
# L = \frac{1}{|\mathcal T|} \sum_{t \in \mathcal T} \ell_t, \qquad
# \bar z_t = \frac{\bar L}{|\mathcal T|}\bigl(\operatorname{softmax}(z_t) - e_{y_t}\bigr),
# $$ (eq-cross-entropy)
#
# where $\mathcal T$ is the set of positions whose label is not `-100` (ignored positions get a
# zero gradient). Fusing the loss and its gradient this way never forms the $N \times V$ matrix of
# log-probabilities, and every gradient entry is bounded by $\bar L / |\mathcal T|$ in size, however
# large the logits. Like every loss in refimpl it is one call that returns the loss and its gradient
# (scaled by an upstream `dloss`, 1 by default); `grad=False` skips the gradient.

# %%
show_source(cross_entropy, checks=False)

# %%
logits = 2 * rng.standard_normal((2, 5, 11))                  # (B, T, V)
targets = rng.integers(0, 11, size=(2, 5))                    # (B, T) int64
targets[0, :2] = -100                                         # e.g. prompt tokens: no loss


def ce_vjp(logits, targets, reduction="mean"):
    """check_grad's (value, vjp) form of a loss: the vjp calls the loss again with dloss."""
    loss, _ = cross_entropy(logits, targets, reduction=reduction, backend="numpy", grad=False)
    return loss, lambda dloss: (cross_entropy(logits, targets, dloss, reduction=reduction, backend="numpy")[1],
                                None)


record("cross_entropy (mean, ignore_index)", check_grad(ce_vjp, [logits, targets]))
record("cross_entropy (none)",
       check_grad(lambda z, t: ce_vjp(z, t, reduction="none"), [logits, targets]))

# ignored rows get exactly zero gradient; every other row sums to zero
loss, dlogits = cross_entropy(logits, targets, backend="numpy")  # (), (B, T, V)
assert np.all(dlogits[0, :2] == 0) and np.abs(dlogits.sum(-1)).max() < 1e-15

# %% [markdown]
# ### The Numba twin
#
# Over a real vocabulary the NumPy version materialises `exp(logits - max)` for the whole matrix.
# `backend="numba"` runs a twin (`refimpl.kernels.cross_entropy_nb`) that reads each row from memory
# once (an online log-sum-exp over cache-sized blocks), in parallel over rows, and accumulates the
# blocks' partial sums in float64. It must agree with the reference to
# the project's float64 and float32 equivalence tolerances (the first call compiles the kernel;
# later processes load it from the cache).

# %%
def ce_both(logits, targets, reduction):
    out = {}
    for backend in ("numpy", "numba"):
        dloss = np.ones(targets.shape, logits.dtype) if reduction == "none" else 1.0
        out[backend] = cross_entropy(logits, targets, dloss, reduction=reduction, backend=backend)
    return out


big_logits = 4 * rng.standard_normal((64, 1000))             # (N, V)
big_targets = rng.integers(0, 1000, size=64)                  # (N,)
big_targets[::7] = -100
for dtype, tol_name in ((np.float64, "equiv64"), (np.float32, "equiv32")):
    for reduction in ("mean", "sum", "none"):
        out = ce_both(big_logits.astype(dtype), big_targets, reduction)
        for a, b in zip(out["numpy"], out["numba"], strict=True):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_allclose(b, a, **tol(tol_name))
    print(f"{np.dtype(dtype).name}: numba twin == numpy reference (loss and dlogits, 3 "
          "reductions), "
          f"tolerance {tol_name} {tol(tol_name)}")

# %% [markdown]
# ### Extreme logits
#
# Logits of magnitude $10^4$ are far outside what a trained model produces, but they are where a
# careless `exp` overflows (float32 overflows above about 88.7). Both backends must return finite,
# exact answers: if the target's logit is $10^4$ and another is $-10^4$, the loss is $0$; if the
# target is the $-10^4$ one, the loss is $2 \times 10^4$. A batch whose positions are all ignored
# has loss $0$, not the $0/0$ that a plain mean would give.

# %%
z = np.array([[1e4, -1e4, 0.0, 5.0], [1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, -1e4]])   # (3, V)
t = np.array([0, 1, 2])
for dtype in (np.float32, np.float64):
    for backend in ("numpy", "numba"):
        with np.errstate(over="raise", invalid="raise"):
            per_row, dz = cross_entropy(z.astype(dtype), t, np.ones(3, dtype), reduction="none", backend=backend)
        assert np.all(np.isfinite(per_row)) and np.all(np.isfinite(dz))
        np.testing.assert_allclose(per_row, [0.0, 2e4, np.log(4)], rtol=1e-6)
        np.testing.assert_allclose(dz[0], [0, 0, 0, 0], atol=1e-6)
        np.testing.assert_allclose(dz[1], [1, -1, 0, 0], atol=1e-6)
        print(f"{np.dtype(dtype).name:8s} {backend:6s} losses {per_row}")

all_ignored, dz = cross_entropy(z, np.full(3, -100), backend="numpy")
assert all_ignored == 0.0 and np.all(dz == 0)

# %% [markdown]
# ## Rotary position embedding
#
# RoPE {cite}`su2021roformer` encodes the position $p$ of a query or key by rotating each pair of
# channels $(x_{2i}, x_{2i+1})$ by the angle $p\,\theta_i$, with $\theta_i = b^{-2i/D_r}$ and
# $b = 10^4$. In MLA only the `Dr` = 64 decoupled channels rotate {cite}`deepseekai2024v2`
# (§2.1.3), and DeepSeek's weights pair **adjacent** channels. For one pair, with the rotation
# matrix $R(\alpha)$ and an amplitude $a$ (1 unless YaRN says otherwise):
#
# $$
# \begin{pmatrix} y_{2i} \\ y_{2i+1} \end{pmatrix} = a\,R(p\theta_i)
# \begin{pmatrix} x_{2i} \\ x_{2i+1} \end{pmatrix},
# \qquad
# R(\alpha) = \begin{pmatrix} \cos\alpha & -\sin\alpha \\ \sin\alpha & \cos\alpha \end{pmatrix}.
# $$ (eq-rope)
#
# The map is linear in $x$, so its backward pass is its transpose, and a rotation's transpose is
# the rotation the other way: $\bar x = a\,R(-p\theta_i)\,\bar y$. No cache beyond the cos/sin
# tables is needed. The property that makes RoPE useful follows from the same algebra: since
# $R(\alpha)^\top R(\beta) = R(\beta - \alpha)$,
#
# $$
# \bigl\langle R(p\theta) q,\; R(s\theta) k \bigr\rangle = \bigl\langle q,\; R((s - p)\theta)\, k \bigr\rangle ,
# $$ (eq-rope-relative)
#
# so a query-key score depends on the two positions only through their distance.

# %%
show_source(rope_forward, rope_backward, checks=False)

# %% tags=["hide-input"]
Dr = 64
inv_freq = rope_inv_freq(Dr, 10000.0)                     # (Dr/2,)
positions = np.arange(32)                                 # (T,)
q = rng.standard_normal(Dr)                               # (Dr,) one query ...
k = rng.standard_normal(Dr)                               # (Dr,) ... and one key, placed at every position
q_rot, _ = rope_forward(np.tile(q, (32, 1)), positions, inv_freq)   # (T, Dr)
k_rot, _ = rope_forward(np.tile(k, (32, 1)), positions, inv_freq)   # (T, Dr)
scores = q_rot @ k_rot.T                                  # (T, T): scores[p, s] = <q at p, k at s>

# relative position: every diagonal of the score matrix is constant
np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], rtol=1e-12, atol=1e-12)
# a rotation preserves the length of every pair
np.testing.assert_allclose(np.hypot(q_rot[:, 0::2], q_rot[:, 1::2]),
                           np.broadcast_to(np.hypot(q[0::2], q[1::2]), (32, Dr // 2)), rtol=1e-12)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.3))
P = 16                                                    # positions 0..15
radii = {0: 1.0, 4: 0.7, 8: 0.4}                          # pair index -> starting length (any length works)
start = np.zeros(Dr)                                      # (Dr,)
for i, r in radii.items():
    start[2 * i] = r                                      # pair i starts at (r, 0)
turned, _ = rope_forward(np.tile(start, (P, 1)), np.arange(P), inv_freq)   # (P, Dr)
circle = np.linspace(0, 2 * np.pi, 200)
for i, r in radii.items():
    xs, ys = turned[:, 2 * i], turned[:, 2 * i + 1]      # (P,) each
    np.testing.assert_allclose(np.hypot(xs, ys), r, rtol=1e-12)   # stays on its circle
    ax0.plot(r * np.cos(circle), r * np.sin(circle), color="0.85", lw=0.8, zorder=1)
    sc = ax0.scatter(xs, ys, c=np.arange(P), cmap="viridis", s=22, zorder=2)
ax0.set_aspect("equal")
ax0.set_xlim(-1.15, 1.15)
ax0.set_ylim(-1.15, 1.15)
ax0.set_title("three channel pairs rotated to positions p = 0..15", fontsize=10)
ax0.set_xlabel("each pair starts at angle 0 and turns by " + r"$\theta_i$ per position:" + "\n"
               + ", ".join(rf"$i={i}$: {inv_freq[i]:.3g} rad" for i in radii)
               + " (outer to inner)", fontsize=8)
fig.colorbar(sc, ax=ax0, shrink=0.8, label="position p")
im = ax1.imshow(scores, cmap="RdBu_r", vmin=-np.abs(scores).max(), vmax=np.abs(scores).max())
ax1.set_xlabel("key position s")
ax1.set_ylabel("query position p")
ax1.set_title(r"$\langle \mathrm{RoPE}(q, p), \mathrm{RoPE}(k, s)\rangle$: constant along diagonals",
              fontsize=10)
fig.colorbar(im, ax=ax1, shrink=0.8, label="score")
fig.tight_layout()
plt.show()


# %%
def rope(x):
    y, cache = rope_forward(x, pos, inv_freq)
    return y, lambda dy: rope_backward(dy, cache)


def rope_bug_forward_rotation(x):
    y, cache = rope_forward(x, pos, inv_freq)
    # deliberately wrong: rotates dy by +p*theta (the forward direction) instead of -p*theta
    return y, lambda dy: rope_backward(dy, cache._replace(sin=-cache.sin))


x = rng.standard_normal((2, 5, 3, Dr))                    # (B, T, H, Dr)
pos = np.arange(5)[:, None] + 100                         # (T, 1): broadcasts over the heads
record("rope", check_grad(rope, [x]))
err = check_grad(rope_bug_forward_rotation, [x])
bug_errors["rope, backward rotates the wrong way"] = err
print(f"rope with the backward rotating the wrong way: worst relative error {err:.2f}")
assert err > 1e-2

# %% [markdown]
# ### YaRN: stretching the slow pairs
#
# DeepSeek-V2 and V3 were pre-trained with a 4096-token context and extended to 128K tokens with
# YaRN {cite}`peng2024yarn` (DeepSeek-V2 §3.1.4, DeepSeek-V3 §4.3 {cite}`deepseekai2024v3`). The
# idea is easiest to see in wavelengths, $\lambda_i = 2\pi / \theta_i$ tokens per full turn of
# pair $i$. Fast pairs turn many times within 4096 tokens and have already seen every angle; slow
# pairs turn less than once, so positions beyond 4096 would show them angles they never saw in
# training. YaRN leaves the first group alone, divides the frequency of the second by the scale
# factor $s = 40$ (so they keep turning less than once over $40 \times 4096 = 163\,840$ tokens), and
# ramps linearly in between:
#
# $$
# \theta'_i = \theta_i(1 - r_i) + \frac{\theta_i}{s}\, r_i, \qquad
# r_i = \operatorname{clip}\Bigl(\frac{i - \text{low}}{\text{high} - \text{low}}, 0, 1\Bigr).
# $$ (eq-yarn)
#
# The ramp's ends are the pairs that make $\beta_\text{fast} = 32$ turns and
# $\beta_\text{slow} = 1$ turn over the original 4096 tokens. For DeepSeek-V3's configuration
# (`Dr` = 64, $b = 10^4$) they fall at low = 10 and high = 23.

# %%
show_source(yarn_correction_range, rope_inv_freq, checks=False)

# %% tags=["hide-input"]
cfg = ModelConfig.preset("deepseek-v3")
rs = cfg.rope_scaling
Dr, base, L, s = cfg.qk_rope_head_dim, cfg.rope_theta, rs["original_max_position_embeddings"], rs["factor"]
print(f"DeepSeek-V3: qk_rope_head_dim={Dr}, rope_theta={base:g}, rope_scaling={rs}")

theta = rope_inv_freq(Dr, base)                           # (Dr/2,) original frequencies
theta_yarn = rope_inv_freq(Dr, base, rs)                  # (Dr/2,) YaRN-corrected
ratio = theta_yarn / theta                                # (Dr/2,)
i = np.arange(Dr // 2)                                    # (Dr/2,) pair index
low, high = yarn_correction_range(Dr, base, L, rs["beta_fast"], rs["beta_slow"])
assert (low, high) == (10, 23)
assert np.all(ratio[i <= low] == 1.0)                     # fast pairs: untouched
np.testing.assert_allclose(ratio[i >= high], 1 / s, rtol=1e-12)   # slow pairs: frequency / 40
np.testing.assert_allclose(ratio[low:high + 1], 1 - (i[low:high + 1] - low) / (high - low) * (1 - 1 / s),
                           rtol=1e-12)                    # a straight line in between
np.testing.assert_allclose(ratio[11], 0.925, rtol=1e-12)

wavelength = 2 * np.pi / theta                            # (Dr/2,) tokens per full turn
wavelength_yarn = 2 * np.pi / theta_yarn                  # (Dr/2,)
# the ramp's ends are exactly where a pair makes 32 turns and 1 turn in the original context
assert np.all(wavelength[i <= low] < L / 32) and np.all(wavelength[i > low] > L / 32)
assert np.all(wavelength[i < high] < L) and np.all(wavelength[i >= high] > L)
# after YaRN, the slow pairs still turn less than once over the whole extended context
assert np.all(wavelength_yarn[i >= high] > s * L)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
ax0.plot(i, ratio, "o-", ms=4)
ax0.axvspan(-0.5, low, color="C2", alpha=0.12, label=f"kept (i ≤ low = {low})")
ax0.axvspan(high, Dr // 2 - 0.5, color="C3", alpha=0.12, label=f"interpolated (i ≥ high = {high})")
ax0.set_xlabel("pair index i")
ax0.set_ylabel(r"$\theta'_i / \theta_i$")
ax0.set_title(f"YaRN frequency ramp, DeepSeek-V3 (s = {s})", fontsize=10)
ax0.legend(fontsize=8, frameon=False)
ax1.semilogy(i, wavelength, "o-", ms=4, label=r"original $\lambda_i = 2\pi/\theta_i$")
ax1.semilogy(i, wavelength_yarn, "s-", ms=3, label=r"YaRN $\lambda'_i$")
for level, text in ((L / 32, "4096 / 32 (32 turns)"), (L, "4096 (1 turn)"), (s * L, "163 840 = 40 × 4096")):
    ax1.axhline(level, color="0.5", lw=0.8, ls="--")
    ax1.annotate(text, (0, level), xytext=(0, 3), textcoords="offset points", fontsize=7, color="0.3")
ax1.axvline(low, color="C2", lw=0.8)
ax1.axvline(high, color="C3", lw=0.8)
ax1.set_xlabel("pair index i")
ax1.set_ylabel("wavelength (tokens per turn)")
ax1.set_title("wavelengths against the 4096-token pre-training context", fontsize=10)
ax1.legend(fontsize=8, frameon=False, loc="lower right")
fig.tight_layout()
plt.show()

# %% [markdown]
# YaRN also sharpens attention to compensate for the longer context: the attention logits are
# multiplied by $m^2$ with $m = 0.1\,\mu \ln s + 1$ ($\mu = 1$ for V3). The MLA chapter uses this
# factor; here we only check its value and note that the rotation itself keeps amplitude
# $a = 1$ for the released configurations.

# %%
m = yarn_mscale(s, rs["mscale_all_dim"])
assert rope_attention_factor(rs) == 1.0                                 # cos/sin amplitude a = 1
assert abs(m - 1.368888) < 1e-6
assert abs(softmax_scale(cfg.qk_head_dim, rs) - 0.1352338) < 1e-7      # 192^-1/2 * m^2
print(f"m = {m:.6f}; softmax scale = 192^-1/2 * m^2 = {softmax_scale(cfg.qk_head_dim, rs):.7f}")

# %% [markdown]
# ## Summary
#
# Every backward pass in this chapter agrees with finite differences to better than $10^{-6}$,
# most of them to about $10^{-10}$, the rounding floor of the checker itself. The three deliberate
# bugs miss by factors of $10^5$ or more: there is no grey zone between a right and a wrong
# gradient, which is what makes a single tolerance workable for the whole project.
#
# The next chapters build on these pairs: {doc}`03_mla` combines linear maps, RMSNorm, softmax and
# RoPE with YaRN ({eq}`eq-yarn`) into latent attention, {doc}`04_moe` routes tokens to SwiGLU
# experts ({eq}`eq-swiglu`), and {doc}`05_tiny_v3` trains a whole model on the cross-entropy of
# {eq}`eq-cross-entropy`.

# %% tags=["hide-input"]
names = list(grad_errors) + list(bug_errors)
values = [max(v, 1e-16) for v in list(grad_errors.values()) + list(bug_errors.values())]
colors = ["C0"] * len(grad_errors) + ["C3"] * len(bug_errors)
fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) + 1.2))
ax.barh(names, values, color=colors)
ax.axvline(GRAD_TOL, color="k", ls="--", lw=1, label=f"tolerance {GRAD_TOL:g}")
ax.legend(loc="upper right", fontsize=8, frameon=False)
ax.set_xscale("log")
ax.set_xlabel("worst relative error against central differences")
ax.invert_yaxis()
ax.set_title("hand-written backward passes (blue) and deliberate bugs (red)", fontsize=10)
fig.tight_layout()
plt.show()

assert max(grad_errors.values()) < GRAD_TOL < 1e-2 < min(bug_errors.values())
print(f"{len(grad_errors)} gradient checks passed; {len(bug_errors)} bugs caught; "
      f"chapter ran in {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## Exercises
#
# Each solution is hidden below its exercise (click to show it); it runs when the book is built
# and asserts its answer, so a wrong solution would stop the build.
#
# 1. **Gradients that sum to zero.** Adding the same constant to every logit changes neither the
#    softmax nor the log-softmax, so by {eq}`eq-softmax-backward` the gradient of each with respect
#    to its input must sum to zero along the softmax axis, whatever arrives from above. Check this
#    with `softmax_backward` and `log_softmax_backward` for a random upstream gradient, and show
#    that the log-sum-exp gradient sums to the upstream gradient instead.

# %% tags=["hide-cell"]
# Exercise 1
x = rng.standard_normal((5, 7))
up = rng.standard_normal((5, 7))
for name, fwd, bwd in (("softmax", softmax_forward, softmax_backward),
                       ("log-softmax", log_softmax_forward, log_softmax_backward)):
    _, cache = fwd(x)
    row_sums = bwd(up, cache).sum(axis=-1)
    print(f"{name:12s} gradient row sums: max |sum| = {np.abs(row_sums).max():.1e}")
    assert np.abs(row_sums).max() < 1e-13
up_lse = rng.standard_normal(5)
_, cache = logsumexp_forward(x)
np.testing.assert_allclose(logsumexp_backward(up_lse, cache).sum(axis=-1), up_lse, rtol=1e-13)
print("log-sum-exp gradient rows sum to the upstream gradient (the softmax weights sum to 1)")

# %% [markdown]
# 2. **SiLU from its output.** A memory-saving kernel keeps only $\sigma(g)$ and $y = g\,\sigma(g)$
#    for the backward pass instead of $g$. Write the gradient of SiLU ({eq}`eq-swiglu`) in terms of
#    $\sigma$ and $y$ alone, code it, and check it against `silu_backward` and with `check_grad`.

# %% tags=["hide-cell"]
# Exercise 2: silu'(g) = s + g s (1 - s) = s + y (1 - s), with s = sigmoid(g) and y = g s
def silu_from_output(g):
    s = sigmoid(g)
    y = g * s

    def backward(dy):
        return (dy * (s + y * (1.0 - s)),)                  # uses s and y only, not g

    return y, backward


g = 4 * rng.standard_normal((6, 9))
dy = rng.standard_normal(g.shape)
_, silu_cache = silu_forward(g)
np.testing.assert_allclose(silu_from_output(g)[1](dy)[0], silu_backward(dy, silu_cache), **tol("equiv64"))
err = check_grad(silu_from_output, [g])
print(f"SiLU backward from (sigma, y): matches silu_backward; gradient check {err:.1e}")
assert err < GRAD_TOL

# %% [markdown]
# 3. **Relative positions.** Use `rope_forward` to verify {eq}`eq-rope-relative`: shifting the
#    positions of a query and a key by the same amount leaves their dot product unchanged, while
#    changing their distance does not. Then use the linearity of RoPE to explain why
#    `rope_backward` needs no cache except the cos/sin tables.

# %% tags=["hide-cell"]
# Exercise 3
inv = rope_inv_freq(16)
q, k = rng.standard_normal(16), rng.standard_normal(16)


def score(p, s):
    return rope_forward(q, np.array(p), inv)[0] @ rope_forward(k, np.array(s), inv)[0]


shifted = [score(3 + d, 10 + d) for d in (0, 100, 12345)]
print("same distance, shifted positions:", np.round(shifted, 12))
np.testing.assert_allclose(shifted, shifted[0], rtol=1e-9)
assert abs(score(3, 10) - score(3, 11)) > 1e-3          # a different distance gives a different score
# RoPE is y = R x with R orthogonal and independent of x, so the backward pass is R^T dy: only the
# angles (cos/sin) are needed. Check the adjoint identity <R x, dy> = <x, R^T dy> for random x, dy,
# and that R^T undoes R (a rotation's transpose is its inverse).
x16, dy16 = rng.standard_normal(16), rng.standard_normal(16)
y16, rot = rope_forward(x16, np.array(7), inv)
assert abs(y16 @ dy16 - x16 @ rope_backward(dy16, rot)) < 1e-12
np.testing.assert_allclose(rope_backward(y16, rot), x16, **tol("equiv64"))
print("rope_backward is the transpose (and the inverse) of the rotation")

# %% [markdown]
# 4. **Cross-entropy's bounded gradient.** From {eq}`eq-cross-entropy`, every entry of the
#    gradient of the mean cross-entropy lies in $[-1/|\mathcal T|, 1/|\mathcal T|]$, each row sums to
#    zero, and ignored rows get zero. Check all three with logits of magnitude $10^4$ and a third of
#    the labels set to `-100`.

# %% tags=["hide-cell"]
# Exercise 4
n, v = 12, 50
z = 1e4 * rng.standard_normal((n, v))
labels = rng.integers(0, v, n)
labels[::3] = -100
_, dz = cross_entropy(z, labels)
n_valid = int((labels != -100).sum())
assert np.all(np.isfinite(dz)) and np.abs(dz).max() <= 1 / n_valid + 1e-15
assert np.abs(dz.sum(axis=-1)).max() < 1e-15
assert np.all(dz[labels == -100] == 0)
print(f"|T| = {n_valid}: max |dz| = {np.abs(dz).max():.4f} <= 1/|T| = {1 / n_valid:.4f}; rows sum to 0; "
      "ignored rows are 0")
