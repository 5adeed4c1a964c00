"""refimpl vs HF transformers on tiny random DeepSeek-V2/V3 checkpoints saved in the hub layout.

transformers computes every RMSNorm, the router and the RoPE tables in float32 even in a float64
model (reference §10). The oracle here runs with the modeling modules' ``torch.float32`` mapped to
float64 (:func:`_float64_oracle`), which lifts RMSNorm, the router and the attention softmax to
float64; the RoPE inverse frequencies (and V2's complex rotation) stay float32 inside
transformers, so logits are compared with tolerance ``"transformers64"`` and, in addition, to an
absolute 1e-6.
"""

import types

import numpy as np
import pytest

from refimpl import load_pretrained
from refimpl.testing import tol

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
COMMON = dict(vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12, qk_rope_head_dim=4, v_head_dim=8,
              qk_nope_head_dim=8, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
              initializer_range=0.2)

CASES = {
    "v3-yarn-qlora": ("v3", dict(q_lora_rank=16, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                                 rope_scaling=YARN)),
    "v3-no-qlora": ("v3", dict(q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, n_group=2, topk_group=1,
                               norm_topk_prob=False, routed_scaling_factor=1.5)),
    "v2-greedy": ("v2", dict(q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, topk_method="greedy",
                             routed_scaling_factor=1.0)),
    "v2-group-yarn": ("v2", dict(q_lora_rank=16, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                                 topk_method="group_limited_greedy", routed_scaling_factor=16.0,
                                 rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
}


class _Float64Torch(types.ModuleType):
    """``torch`` with ``float32``/``float`` meaning float64, for the modeling modules' globals."""

    def __init__(self, torch):
        super().__init__("torch")
        self._torch, self.float32, self.float = torch, torch.float64, torch.float64

    def __getattr__(self, name):
        return getattr(self._torch, name)


@pytest.fixture(autouse=True)
def _float64_oracle(monkeypatch):
    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3
    for mod in (modeling_deepseek_v2, modeling_deepseek_v3):
        monkeypatch.setattr(mod, "torch", _Float64Torch(torch))


def _hf_model(kind, extra, seed=0):
    torch.manual_seed(seed)
    if kind == "v3":
        cfg = transformers.DeepseekV3Config(**COMMON, **extra, experts_implementation="eager",
                                            attn_implementation="eager")
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**COMMON, **extra, experts_implementation="eager",
                                            attn_implementation="eager")
        model = transformers.DeepseekV2ForCausalLM(cfg)
    model = model.to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # non-zero: selection differs from weights
                b.copy_(0.5 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    kind, extra = CASES[request.param]
    model = _hf_model(kind, extra)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def _ids(seed=0, shape=(2, 9)):
    return np.random.default_rng(seed).integers(0, COMMON["vocab_size"], shape)


def test_logits_match_transformers(saved, capsys):
    """Measured max |logits - transformers| (print with -s): ~1e-9..1e-8 for V3, ~7e-7 for V2 (float32
    complex RoPE inside transformers' V2)."""
    name, model, path = saved
    m = load_pretrained(path)
    ids = _ids(0, (3, 12))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    got = m(ids)
    assert got.dtype == np.float64 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, **tol("transformers64"))
    err = np.abs(got - ref).max()
    print(f"{name}: max |logits - transformers| = {err:.2e}")
    assert err < 1e-6


def test_greedy_generation_matches_transformers(saved):
    name, model, path = saved
    m = load_pretrained(path)
    ids = _ids(1, (2, 5))
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                             pad_token_id=0, eos_token_id=None).numpy()
    got = m.generate(ids, max_new_tokens=8)
    np.testing.assert_array_equal(got, ref)



def _fused_to_hub(named):
    """transformers' in-memory tensors -> hub names (fused gate_up_proj / stacked down_proj split per expert)."""
    out = {}
    for n, g in named:
        if n.endswith("experts.gate_up_proj"):
            half = g.shape[1] // 2
            for e in range(g.shape[0]):
                out[n.replace("gate_up_proj", f"{e}.gate_proj.weight")] = g[e, :half]
                out[n.replace("gate_up_proj", f"{e}.up_proj.weight")] = g[e, half:]
        elif n.endswith("experts.down_proj"):
            for e in range(g.shape[0]):
                out[n.replace("down_proj", f"{e}.down_proj.weight")] = g[e]
        else:
            out[n] = g
    return out


def test_training_step_matches_autograd_and_torch_adamw(saved):
    """A full step vs torch: gradients of the next-token CE for every parameter (autograd through
    transformers), then global-norm clipping and AdamW (torch.optim.AdamW, matrices decayed)."""
    from refimpl.model import loss_backward, loss_forward
    from refimpl.model.checkpoint import to_hub
    from refimpl.optim import adamw_init, adamw_update, clip_grad_norm

    name, model, path = saved
    m = load_pretrained(path)
    ids = _ids(3, (2, 10))
    model.zero_grad()
    logits = model(torch.from_numpy(ids)).logits                 # float64 (transformers' loss upcasts to fp32)
    t = torch.from_numpy(ids)
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
    ref_loss.backward()
    loss, cache, _ = loss_forward(ids, m.params, m.config, balance="none", backend="numpy")
    assert float(loss) == pytest.approx(ref_loss.item(), rel=1e-7)
    grads = loss_backward(1.0, cache, m.params)
    hub_grads = to_hub(grads, m.config)
    ref = _fused_to_hub((n, p.grad.numpy().copy()) for n, p in model.named_parameters())
    assert set(ref) <= set(hub_grads)
    scale = max(np.abs(g).max() for g in ref.values())
    for n, g in ref.items():
        np.testing.assert_allclose(hub_grads[n], g, rtol=1e-5, atol=1e-7 * scale, err_msg=n)
    # clipping + AdamW
    named = list(model.named_parameters())
    torch.nn.utils.clip_grad_norm_([p for _, p in named], 0.5)
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt.step()
    # the optimiser is compared on torch's own gradients: Adam's first step ~ lr * g / (|g| + eps)
    # amplifies the ~1e-8 gradient differences of entries with |g| near eps, which says nothing
    from refimpl.model.checkpoint import from_hub
    torch_grads = from_hub({n: ref.get(n, np.zeros(a.shape)) for n, a in hub_grads.items()}, m.config)
    clipped, _ = clip_grad_norm(torch_grads, 0.5)
    new, _ = adamw_update(m.params, clipped, adamw_init(m.params), lr=1e-2, weight_decay=0.1)
    new_hub = to_hub(new, m.config)
    for n, p in _fused_to_hub((n, p.detach().numpy()) for n, p in named).items():
        np.testing.assert_allclose(new_hub[n], p, **tol("torch64"), err_msg=n)


def test_refimpl_saved_checkpoint_loads_in_transformers(tmp_path):
    """save_pretrained writes the hub layout: transformers loads it and computes the same logits."""
    from refimpl.model import init_params, model_forward, save_pretrained

    from .conftest import tiny_config

    cfg = tiny_config(num_nextn_predict_layers=0, vocab_size=20)
    params = init_params(cfg, np.random.default_rng(0), mtp=False)
    params["model"]["layers"][1]["mlp"]["gate"]["e_score_correction_bias"] = np.linspace(-0.5, 0.5, 4)
    save_pretrained(tmp_path, params, cfg)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                               experts_implementation="eager",
                                                               attn_implementation="eager").eval()
    ids = _ids(4, (2, 7)) % cfg.vocab_size
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model_forward(ids, params, cfg)[0], ref, **tol("transformers64"))


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_mtp_loss_gradients_match_autograd():
    """CE + 0.3 * MTP loss (depth 1): refimpl's hand-written gradients vs torch autograd, with
    transformers' decoder layers as the main layers and as the MTP block (its layer N), and the MTP
    glue (enorm, hnorm, eh_proj on cat[emb, h], shared_head.norm, shared head) written in torch."""
    from refimpl.model import init_params, loss_backward, loss_forward, to_hub

    from .conftest import tiny_config

    cfg = tiny_config(aux_loss_alpha=0.0, vocab_size=20)
    params = init_params(cfg, np.random.default_rng(5))
    rng = np.random.default_rng(6)
    for lp in params["model"]["layers"][1:] + params["mtp"]:
        lp["mlp"]["gate"]["e_score_correction_bias"] = 0.3 * rng.standard_normal(cfg.n_routed_experts)
    for leaf in ("enorm", "hnorm"):
        params["mtp"][0][leaf] = 1 + 0.2 * rng.standard_normal(cfg.hidden_size)
    hub = to_hub(params, cfg)
    keep = {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "num_nextn_predict_layers")}
    hf = transformers.DeepseekV3Config(**{**keep, "num_hidden_layers": 3}, experts_implementation="eager",
                                       attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(hf).to(torch.float64)
    sd = {}
    for n, p in model.state_dict().items():
        if n.endswith("experts.gate_up_proj"):
            pre = n[:-len("gate_up_proj")]
            sd[n] = np.stack([np.concatenate([hub[f"{pre}{e}.gate_proj.weight"], hub[f"{pre}{e}.up_proj.weight"]])
                              for e in range(p.shape[0])])
        elif n.endswith("experts.down_proj"):
            sd[n] = np.stack([hub[f"{n[:-len('down_proj')]}{e}.down_proj.weight"] for e in range(p.shape[0])])
        else:
            sd[n] = hub[n]
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    glue = {k: torch.from_numpy(np.array(params["mtp"][0][k])).requires_grad_(True) for k in ("enorm", "hnorm",
                                                                                              "eh_proj")}
    glue["shared_head.norm"] = torch.from_numpy(np.array(params["mtp"][0]["shared_head"]["norm"])).requires_grad_(True)

    ids = rng.integers(0, cfg.vocab_size, (2, 7))
    t = torch.from_numpy(ids)
    inner = model.model

    def run_layers(h, layers):
        n = h.shape[1]
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf"), dtype=h.dtype).triu(1)[None, None]
        emb = inner.rotary_emb(h, pos)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
        return h

    hn = inner.norm(run_layers(inner.embed_tokens(t), inner.layers[:2]))      # (B, T, D)
    ce = torch.nn.functional.cross_entropy
    v = cfg.vocab_size
    main = ce(model.lm_head(hn)[:, :-1].reshape(-1, v), t[:, 1:].reshape(-1))
    x = torch.cat([_rms(inner.embed_tokens(t[:, 1:]), glue["enorm"]), _rms(hn[:, :-1], glue["hnorm"])], -1)
    y = run_layers(x @ glue["eh_proj"].T, inner.layers[2:])                     # (B, T-1, D)
    mtp_logits = model.lm_head(_rms(y, glue["shared_head.norm"]))
    mtp = ce(mtp_logits[:, :-1].reshape(-1, v), t[:, 2:].reshape(-1))
    (main + 0.3 * mtp).backward()

    loss, cache, info = loss_forward(ids, params, cfg, mtp_lambda=0.3, backend="numpy")
    assert float(loss) == pytest.approx((main + 0.3 * mtp).item(), rel=1e-7)
    grads = to_hub(loss_backward(1.0, cache, params), cfg)
    ref = _fused_to_hub((n, p.grad.numpy().copy()) for n, p in model.named_parameters())
    ref.update({f"model.layers.2.{k}.weight": g.grad.numpy() for k, g in glue.items()})
    assert set(ref) <= set(grads) and "model.layers.2.mlp.experts.0.up_proj.weight" in ref
    assert np.abs(ref["model.layers.2.eh_proj.weight"]).max() > 0
    scale = max(np.abs(g).max() for g in ref.values())
    for n, g in ref.items():
        np.testing.assert_allclose(grads[n], g, rtol=1e-5, atol=1e-7 * scale, err_msg=n)
