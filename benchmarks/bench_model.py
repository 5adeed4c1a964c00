"""The whole model: one training step vs torch, and decoding with vs without the latent cache.

* ``model/train-step`` -- forward, hand-written backward and AdamW of a small DeepSeek-V3-style
  model (D = 256, 4 layers of which 2 MoE with 16 routed experts top-4 + 1 shared, H = 4, Dq = 128,
  Dc = 64, V = 1024, B x T = 4 x 128, float32, no MTP, no balance loss) in refimpl vs the same
  model in transformers (``DeepseekV3ForCausalLM``, eager experts and attention) with torch
  autograd and ``torch.optim.AdamW``. The check compares the first call's loss (the float32
  router may flip near-ties between the two, so only the loss is compared, at 1e-4).
* ``model/decode`` -- greedy generation of 32 tokens after a 32-token prompt with the absorbed
  latent cache (``refimpl-numpy``) vs recomputing the full forward at every step
  (``refimpl-numpy-nocache``); both must produce the same tokens.
"""

from __future__ import annotations

import numpy as np

from refimpl.config import ModelConfig
from refimpl.model import generate, init_params, loss_backward, loss_forward, to_hub
from refimpl.optim import adamw_init, adamw_update

from .harness import NUMPY, TORCH, Case, assert_outputs_close, import_torch, register


def _config(quick):
    cfg = ModelConfig.preset("tiny").replace(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=2, max_position_embeddings=256, aux_loss_alpha=0.0,
        initializer_range=0.02)
    if quick:
        cfg = cfg.replace(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    return cfg


def _torch_model(torch, cfg, params):
    import transformers
    d = cfg.to_dict()
    keep = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
                              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                              "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                              "topk_group", "first_k_dense_replace", "max_position_embeddings",
                              "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps")}
    hf = transformers.DeepseekV3Config(**keep, experts_implementation="eager", attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(hf).float()
    hub = to_hub(params, cfg)
    sd = {}
    for n, p in model.state_dict().items():
        if n.endswith("experts.gate_up_proj"):
            pre = n[:-len("gate_up_proj")]
            e = p.shape[0]
            sd[n] = np.stack([np.concatenate([hub[f"{pre}{i}.gate_proj.weight"], hub[f"{pre}{i}.up_proj.weight"]])
                              for i in range(e)])
        elif n.endswith("experts.down_proj"):
            pre = n[:-len("down_proj")]
            sd[n] = np.stack([hub[f"{pre}{i}.down_proj.weight"] for i in range(p.shape[0])])
        else:
            sd[n] = hub[n]
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    return model


@register("model/train-step")
def train_step(quick: bool) -> Case:
    cfg = _config(quick)
    b, t = (2, 32) if quick else (4, 128)
    params = init_params(cfg, np.random.default_rng(0), np.float32)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (b, t))
    opt = adamw_init(params)
    case = Case(params={"B": b, "T": t, "D": cfg.hidden_size, "layers": cfg.num_hidden_layers, "MoE layers": 2,
                        "E": cfg.n_routed_experts, "dtype": "float32"},
                description="one training step: forward, backward, AdamW (refimpl hand-written vs torch autograd)")

    def refimpl_step():
        loss, cache, _ = loss_forward(ids, params, cfg, balance="none", backend="numpy")
        grads = loss_backward(1.0, cache, params)
        adamw_update(params, grads, opt, lr=1e-3)
        return np.asarray(loss)
    case.add(NUMPY, refimpl_step)
    torch = import_torch()
    try:
        model = _torch_model(torch, cfg, params) if torch is not None else None
    except ImportError:
        model = None
    if model is None:
        case.skip(TORCH, "torch or transformers is not installed")
    else:
        topt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        tid = torch.from_numpy(ids)
        state = [s.detach().clone() for s in model.state_dict().values()]

        def torch_step():
            with torch.no_grad():                       # same parameters every call
                for p, s in zip(model.state_dict().values(), state, strict=True):
                    p.copy_(s)
            topt.zero_grad()
            logits = model(tid).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     tid[:, 1:].reshape(-1))
            loss.backward()
            topt.step()
            return loss.detach()
        case.add(TORCH, torch_step)
    case.check = lambda outs: assert_outputs_close(outs, rtol=1e-4)
    return case


@register("model/decode")
def decode(quick: bool) -> Case:
    cfg = _config(quick)
    t, n = (8, 8) if quick else (32, 32)
    params = init_params(cfg, np.random.default_rng(0), np.float32)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, t))
    case = Case(params={"prompt": t, "new tokens": n, "D": cfg.hidden_size, "dtype": "float32"},
                description=f"greedy decode of {n} tokens: latent cache (absorbed MLA) vs full recompute")
    case.add(NUMPY, lambda: generate(params, cfg, ids, n, backend="numpy"))
    case.add("refimpl-numpy-nocache", lambda: generate(params, cfg, ids, n, use_cache=False, backend="numpy"),
             kind="numpy")
    case.check = lambda outs: assert_outputs_close(outs, rtol=0.0)
    return case
