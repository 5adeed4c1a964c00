"""Differential tests: the GRPO losses written directly in torch (TRL's formulas), differentiated by
autograd, against refimpl's hand-written gradients. Float64 on both sides. Skipped without torch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.rl import LOSS_TYPES, grpo_loss_from_logits, logps_entropy_backward, logps_entropy_forward
from refimpl.testing import strategies as rst
from refimpl.testing import tol

from .helpers import make_batch

torch = pytest.importorskip("torch")
TOL = tol("torch64")


def torch_grpo(z, ids, old, ref, adv, mask, *, loss_type, level, kl, beta, eps_lo, eps_hi, delta, l_max,
               tau, ent_coef, tau_pos=1.0, tau_neg=1.05):
    """The TRL GRPOTrainer objective for one process, ga = 1, restated in torch from reference §1."""
    logp_all = torch.log_softmax(z / tau, dim=-1)
    lp = logp_all.gather(-1, ids[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m = mask.double()
    old = lp.detach() if old is None else old
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    log_w = lp - old if level == "token" else ((lp - old) * m).sum(-1, keepdim=True) / n
    r = torch.exp(log_w)
    A = adv[:, None] if adv.dim() == 1 else adv
    if loss_type == "cispo":
        L = -torch.clamp(r, max=eps_hi).detach() * A * lp
    elif loss_type == "sapo":
        t = torch.where(A > 0, torch.tensor(tau_pos, dtype=torch.float64), torch.tensor(tau_neg, dtype=torch.float64))
        L = -A * torch.sigmoid(t * (r - 1)) * 4 / t
    else:
        r2 = torch.clamp(r, 1 - eps_lo, 1 + eps_hi)
        r1 = r if delta is None else torch.clamp(r, max=delta)
        L = -torch.min(r1 * A, r2 * A)
    if beta:
        x = ref - lp
        k = {"k1": -x, "k2": 0.5 * x**2, "k3": torch.exp(x) - x - 1}[kl]
        L = L + beta * k
    L = L * torch.ones_like(m)  # broadcast (B, 1) sequence losses over tokens
    B = m.shape[0]
    if loss_type in ("grpo", "sapo"):
        J = ((L * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        J = (L * m).sum() / (B * l_max)
    else:  # bnpo, dapo, cispo (one process: num_items_in_batch = active tokens)
        J = (L * m).sum() / m.sum().clamp(min=1.0)
    return J - ent_coef * (ent * m).sum() / m.sum().clamp(min=1.0)


def _t(x):
    return None if x is None else torch.tensor(x)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@given(rng=rst.seeds(), level=st.sampled_from(["token", "sequence"]), kl=st.sampled_from(["k1", "k2", "k3"]),
       beta=st.sampled_from([0.0, 0.04]), on_policy=st.booleans(), token_adv=st.booleans(),
       eps_hi=st.sampled_from([None, 0.28, 5.0]), delta=st.sampled_from([None, 1.3]),
       tau=st.sampled_from([1.0, 0.6]), ent_coef=st.sampled_from([0.0, 0.01]))
def test_matches_torch_autograd(loss_type, rng, level, kl, beta, on_policy, token_adv, eps_hi, delta, tau, ent_coef):
    # no kink-avoidance needed: torch and refimpl use the same tie rules, and cispo's cap is
    # exercised on both sides of it (eps_hi = 5.0 is above every ratio)
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=3, T=4, V=6, level=level, spread=0.6,
                                                  loss_type="sapo", token_advantages=token_adv)
    old = None if on_policy else old
    loss, dz, _ = grpo_loss_from_logits(
        logits, ids, old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level, kl_estimator=kl,
        beta=beta, epsilon_high=eps_hi, delta=delta, max_completion_length=6, temperature=tau,
        entropy_coef=ent_coef)
    z = torch.tensor(logits, requires_grad=True)
    J = torch_grpo(z, torch.tensor(ids), _t(old), _t(ref), torch.tensor(adv), torch.tensor(mask),
                   loss_type=loss_type, level=level, kl=kl, beta=beta, eps_lo=0.2,
                   eps_hi=0.2 if eps_hi is None else eps_hi, delta=delta, l_max=6, tau=tau, ent_coef=ent_coef)
    J.backward()
    np.testing.assert_allclose(loss, J.item(), **TOL)
    np.testing.assert_allclose(dz, z.grad.numpy(), **TOL)


@given(rng=rst.seeds(), tau=st.sampled_from([1.0, 0.5, 2.0]), scale=st.sampled_from([1.0, 30.0]))
def test_logps_entropy_match_torch(rng, tau, scale):
    z = scale * rng.standard_normal((3, 4, 7))
    ids = rng.integers(0, 7, size=(3, 4))
    g, h = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    lp, ent, cache = logps_entropy_forward(z, ids, temperature=tau)
    dz = logps_entropy_backward(g, h, cache)
    tz = torch.tensor(z, requires_grad=True)
    la = torch.log_softmax(tz / tau, -1)
    tlp = la.gather(-1, torch.tensor(ids)[..., None])[..., 0]
    tent = -(la.exp() * la).sum(-1)
    ((tlp * torch.tensor(g)).sum() + (tent * torch.tensor(h)).sum()).backward()
    np.testing.assert_allclose(lp, tlp.detach().numpy(), **TOL)
    np.testing.assert_allclose(ent, tent.detach().numpy(), **TOL)
    np.testing.assert_allclose(dz, tz.grad.numpy(), **TOL)


@given(rng=rst.seeds(), beta=st.sampled_from([0.0, 0.04]))
def test_sequence_level_grpo_equals_verl_gspo(rng, beta):
    """verl's gspo writes the sequence ratio per token, s_it = exp(sg[log s_i] + l_t - sg[l_t]), and
    aggregates with seq-mean-token-mean: the value and gradient of TRL's sequence level + grpo."""
    logits, ids, old, ref, adv, mask = make_batch(rng, groups=2, G=3, T=4, V=6, level="sequence")
    mask[:, 0] = True                                   # verl divides by the non-empty sequences only
    loss, dz, _ = grpo_loss_from_logits(logits, ids, old, ref, adv, mask, loss_type="grpo", beta=beta,
                                        importance_sampling_level="sequence")
    z = torch.tensor(logits, requires_grad=True)
    lp = torch.log_softmax(z, -1).gather(-1, torch.tensor(ids)[..., None])[..., 0]
    m = torch.tensor(mask).double()
    log_s = ((lp - torch.tensor(old)) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
    r = torch.exp(torch.clamp(log_s.detach() + lp - lp.detach(), max=10.0))
    A = torch.tensor(adv)[:, None]
    L = torch.maximum(-A * r, -A * torch.clamp(r, 0.8, 1.2))
    x = torch.tensor(ref) - lp
    L = L + beta * (torch.exp(x) - x - 1)
    J = ((L * m).sum(-1) / m.sum(-1)).mean()   # verl divides by n_i + 1e-8; left out to compare exactly
    J.backward()
    np.testing.assert_allclose(loss, J.item(), **TOL)
    np.testing.assert_allclose(dz, z.grad.numpy(), **TOL)
