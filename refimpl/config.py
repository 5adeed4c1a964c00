"""Model configuration with the field names of HF ``config.json`` for DeepSeek-V2/V3.

A config read from a checkpoint's ``config.json`` maps onto :class:`ModelConfig` field by field, so
the names a practitioner already knows (``kv_lora_rank``, ``n_routed_experts``,
``routed_scaling_factor``, ...) are the names used everywhere in refimpl. Presets reproduce the
published configurations (DeepSeek-V2 tech report §3.1.2 and App. B; DeepSeek-V3 tech report §4.2).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field

from ._validate import check_bool, check_choice, check_fields, check_integer, check_real

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")

_POS, _NONNEG, _REAL = dict(low=1), dict(low=0), dict(low=0.0)
#: ModelConfig's scalar fields and their checks (the consistency checks follow in ``validate``):
#: (field, helper, keyword arguments) for :func:`refimpl._validate.check_fields`.
FIELD_CHECKS = (
    *[(n, check_integer, _POS) for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "kv_lora_rank",
                                         "qk_rope_head_dim", "v_head_dim", "moe_layer_freq",
                                         "max_position_embeddings")],
    *[(n, check_integer, _NONNEG) for n in ("qk_nope_head_dim", "n_shared_experts", "n_routed_experts",
                                            "first_k_dense_replace", "num_nextn_predict_layers",
                                            "moe_intermediate_size", "num_experts_per_tok", "n_group",
                                            "topk_group")],
    *[(n, check_bool, {}) for n in ("norm_topk_prob", "seq_aux", "attention_bias", "tie_word_embeddings")],
    ("topk_method", check_choice, dict(choices=TOPK_METHODS)),
    ("scoring_func", check_choice, dict(choices=SCORING_FUNCS)),
    ("routed_scaling_factor", check_real, dict(low=0.0, low_open=True)),
    ("aux_loss_alpha", check_real, _REAL),
    ("rope_theta", check_real, dict(low=1.0, low_open=True)),
    ("rms_norm_eps", check_real, dict(low=0.0, low_open=True)),
    ("initializer_range", check_real, _REAL),
)


@dataclass
class ModelConfig:
    """A DeepSeek-V2/V3-style decoder. Field names and defaults follow HF ``DeepseekV3Config``.

    ``q_lora_rank=None`` means no query compression (V2-Lite). ``num_key_value_heads`` is used only
    by the MHA/GQA/MQA baselines. Call :meth:`validate` (done by :meth:`from_dict` and the presets)
    to check that the fields are consistent.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.006
    gate_type: str = "deepseek"   # refimpl's: the MoE router, an entry of refimpl.moe.gates.GATES
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def qk_head_dim(self) -> int:
        """Query/key head dimension ``qk_nope_head_dim + qk_rope_head_dim`` (192 in V2/V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """MoE iff ``layer >= first_k_dense_replace`` and ``layer % moe_layer_freq == 0`` (0-based)."""
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    def validate(self) -> ModelConfig:
        """Raise ``ValueError`` naming the first inconsistent field; return ``self`` otherwise."""
        check_fields(self, FIELD_CHECKS)
        if self.q_lora_rank is not None:
            check_integer("q_lora_rank", self.q_lora_rank, low=0)
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number (RoPE rotates pairs), "
                             f"got {self.qk_rope_head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: expected a divisor of num_attention_heads "
                             f"({self.num_attention_heads}), got {self.num_key_value_heads}")
        if self.n_routed_experts:
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size: expected a positive integer with routed experts, "
                                 f"got {self.moe_intermediate_size}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok: expected 1..n_routed_experts ({self.n_routed_experts}), "
                                 f"got {self.num_experts_per_tok}")
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                raise ValueError(f"n_group: expected a divisor of n_routed_experts ({self.n_routed_experts}), "
                                 f"got {self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group: expected 1..n_group ({self.n_group}), got {self.topk_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok} exceeds the experts in "
                                 f"topk_group={self.topk_group} groups of {per_group}")
            if self.topk_method == "noaux_tc" and per_group < 2 and self.n_group > 1:
                raise ValueError("n_group: noaux_tc scores a group by its top-2 experts, so groups need >= 2 "
                                 f"experts; got {per_group}")
        if self.n_routed_experts:
            from .moe.gates import get_gate  # the router table (refimpl.moe.gates), checked lazily
            gate = get_gate(self.gate_type)
            if gate.check_config is not None:
                gate.check_config(self)
        if self.rope_scaling is not None:
            from .core.rope import check_rope_scaling
            check_rope_scaling(self.rope_scaling)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a ``config.json`` dict; unknown keys are kept in ``extra``."""
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict (a parsed config.json), got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if "num_key_value_heads" not in known and "num_attention_heads" in known:
            known["num_key_value_heads"] = known["num_attention_heads"]
        return cls(**known, extra=extra).validate()

    @classmethod
    def from_json(cls, path) -> ModelConfig:
        """Read an HF ``config.json``."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """The fields as a ``config.json``-style dict (``extra`` merged back in)."""
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    def replace(self, **changes) -> ModelConfig:
        """A validated copy with some fields changed (``extra`` and ``rope_scaling`` are copied, not shared)."""
        changes.setdefault("extra", copy.deepcopy(self.extra))
        changes.setdefault("rope_scaling", copy.deepcopy(self.rope_scaling))
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A published configuration: one of :data:`PRESETS`."""
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls.from_dict(PRESETS[name])


def check_config(config, name: str = "config") -> None:
    """Raise TypeError unless ``config`` is a :class:`ModelConfig` (it lives here, not in
    :mod:`refimpl._validate`, which this module uses: that way round there is no import cycle)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{name}: expected a refimpl.ModelConfig, got {type(config).__name__}")


def _yarn(mscale):
    return {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}


_V2_COMMON = dict(vocab_size=102400, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  kv_lora_rank=512, scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=1,
                  moe_layer_freq=1, rope_theta=10000.0, max_position_embeddings=163840,
                  rope_scaling=_yarn(0.707))

#: Published configurations (HF hub ``config.json`` values; DeepSeek-V2 App. B, DeepSeek-V3 §4.2),
#: plus ``"tiny"``, a small V3-style model for tests and notebooks.
PRESETS = {
    "deepseek-v2-lite": dict(_V2_COMMON, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                             q_lora_rank=None, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0,
                             aux_loss_alpha=0.001),
    "deepseek-v2": dict(_V2_COMMON, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                        num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
                        q_lora_rank=1536, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
                        n_group=8, topk_group=3, topk_method="group_limited_greedy",
                        routed_scaling_factor=16.0, aux_loss_alpha=0.003),
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid",
                        norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=3,
                        moe_layer_freq=1, num_nextn_predict_layers=1, rope_scaling=_yarn(1.0),
                        max_position_embeddings=163840, aux_loss_alpha=0.0001),
    # DeepSeek LLM 67B (dense; transformers' Llama architecture, GQA with 8 KV heads of dim 128):
    # the baseline of DeepSeek-V2's "93.3% smaller KV cache" claim. model_type/architectures are its
    # HF config.json values (kept in ``extra``); refimpl.attention.uses_mla reads model_type.
    "deepseek-67b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=102400,
                         hidden_size=8192, intermediate_size=22016, num_hidden_layers=95,
                         num_attention_heads=64, num_key_value_heads=8, q_lora_rank=None,
                         n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0, n_group=1,
                         topk_group=1, num_experts_per_tok=1, rope_theta=10000.0, rope_scaling=None,
                         max_position_embeddings=4096, rms_norm_eps=1e-6),
    "tiny": dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                 kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="noaux_tc",
                 scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                 first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.02),
}
# DeepSeek-V3.2 (model_type "deepseek_v32"): V3 plus a lightning indexer in every layer; the index_*
# fields (transformers' DeepseekV32Config names) live in ``extra`` (refimpl.attention.index_dims).
PRESETS["deepseek-v32"] = dict(PRESETS["deepseek-v3"], model_type="deepseek_v32",
                               architectures=["DeepseekV32ForCausalLM"], index_n_heads=64, index_head_dim=128,
                               index_topk=2048)
PRESETS["tiny-v32"] = dict(PRESETS["tiny"], model_type="deepseek_v32", index_n_heads=4, index_head_dim=8,
                           index_topk=8)
