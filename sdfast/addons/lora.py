"""LoRA files (kohya/A1111, diffusers/PEFT, LyCORIS LoCon/LoHa/LoKr) and their exact merging.

Reading: `read_lora(path_or_state_dict, unet, text_encoder)` groups a file's tensors by the
module they change, resolves each module name to a weight (`sdfast.addons.targets`) and returns
a `LoraFile` of `LoraModule`s plus the names that matched nothing.

Scales follow kohya: `alpha / rank` with a missing alpha meaning `alpha = rank` (scale 1);
LoHa: `alpha / rank of w1_b`; LoKr: `alpha / rank` when a factor is itself decomposed, else 1.
PEFT files carry no alpha (their `lora_alpha` lives in an adapter config), so scale 1 unless
a `.alpha` tensor is present.

Merging (`LoraStack`): LoRAs are merged into the weights, so sampling runs at full speed. When
a weight is first touched, its original tensor is set aside untouched (for a CPU fp32 load that
is the file's read-only mmap, so it costs no memory) and the parameter gets a writable copy;
every change (load, strength, unload) recomputes each affected weight as `original + sum of
active LoRAs` from the original, in load order, low-rank factors merged in one
`sdfast.ops.lora_merge_` pass. When no LoRA touches a weight any more the original tensor
itself goes back, and its writable copy is kept as a spare for the next load (a swap A -> B
maps no new memory; the pipeline frees the spares once that load or the next `generate` is
under way: `Pipeline.release_lora_buffers`). With `in_place=True` (what CUDA graphs need: `Pipeline.lora_in_place`) it is
the other way round: the original is copied aside and the parameter is rewritten in its own
storage, so every weight keeps its address. Either way unloading restores the original bit
for bit, and A, then B, then A again gives exactly A's weights again, in fp32 and fp16 alike.
Keeping the original rather than subtracting the delta is the only way to exactness:
`w + d - d != w` in floating point.
"""
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from sdfast import ops
from sdfast.errors import SdfastError
from sdfast.io.pages import map_pages, populated_copy, populated_empty_like

from .targets import text_targets, unet_targets

# kohya module prefixes of SDXL (two text encoders) and their diffusers spellings.
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_SDXL_UNET_HINT = re.compile(r"(lora_unet_|unet\.)?(input_blocks|down_blocks)[._]\d+[._](attentions[._]\d+[._])?"
                             r"transformer_blocks[._][2-9]")

# Tensor-name suffixes of each kind (after the module name and a dot).
_LORA_DOWN = ("lora_down.weight", "lora_A.weight", "down.weight", "lora_linear_layer.down.weight")
_LORA_UP = ("lora_up.weight", "lora_B.weight", "up.weight", "lora_linear_layer.up.weight")
_LORA_MID = ("lora_mid.weight",)
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_EXTRA = ("alpha", "dora_scale", "scale")
_SUFFIXES = sorted(_LORA_DOWN + _LORA_UP + _LORA_MID + _LOHA + _LOKR + _EXTRA, key=len, reverse=True)

# Prefixes stripped before the module name is looked up.
_STRIP = ("base_model.model.", "model.diffusion_model.", "diffusion_model.",
          "cond_stage_model.transformer.", "cond_stage_model.model.")
# Old diffusers attention-processor names -> module names.
_PROCESSOR = re.compile(r"(.*)\.processor\.(to_[qkv]|to_out)_lora")


@dataclass
class LoraModule:
    """One layer's change: `kind` "lora" (up, down[, mid]), "loha" or "lokr", its tensors
    (by suffix) and `alpha` (None when the file has none)."""

    name: str
    component: str
    param: str
    rows: tuple | None
    kind: str
    tensors: dict
    alpha: float | None = None

    @property
    def rank(self):
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if key in t:
                return t[key].shape[0]
        return None

    @property
    def scale(self):
        """kohya's multiplier: alpha / rank (alpha missing: 1)."""
        rank = self.rank
        if self.alpha is None or rank is None:
            return 1.0
        return float(self.alpha) / rank

    def factors(self, shape):
        """`(up [O, r], down [r, *rest])` for plain LoRA (a Tucker `mid` folded into `down`),
        shaped for a weight of `shape`; None for the dense kinds."""
        if self.kind != "lora":
            return None
        up, down = self.tensors["up"], self.tensors["down"]
        if "mid" in self.tensors:             # LoCon with a CP/Tucker core: fold the core into down
            mid = self.tensors["mid"].float()                          # [r, r, kh, kw]
            down = torch.einsum("rskl,si->rikl", mid, down.float().flatten(1))
        return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], *shape[1:])

    def delta(self, shape):
        """The dense fp32 change `[O, ...]` (without scale) of a LoHa / LoKr module."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "loha":
            if "hada_t1" in t:
                a = torch.einsum("ijkl,jr,ip->prkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                b = torch.einsum("ijkl,jr,ip->prkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
                return (a * b).reshape(shape)
            return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(shape)


@dataclass
class LoraFile:
    """A parsed LoRA: its modules, the names that matched no layer, and its metadata."""

    modules: list
    unmatched: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def _split(key):
    """`(module name, suffix)` of a tensor name, or None for names of no known kind."""
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _normalise(module):
    """`(component hint, name)`: the name as the target tables spell it."""
    hint = None
    if module.startswith("unet."):
        hint, module = "unet", module[len("unet."):]
    elif module.startswith("text_encoder."):
        hint, module = "text_encoder", module[len("text_encoder."):]
    elif module.startswith("lora_unet_"):
        hint = "unet"
    elif module.startswith("lora_te_"):
        hint = "text_encoder"
    for prefix in _STRIP:
        if module.startswith(prefix):
            module = module[len(prefix):]
    m = _PROCESSOR.fullmatch(module)
    if m:
        module = f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
    if module.endswith(("_lora", ".lora_linear_layer")):
        module = module.rsplit("_lora", 1)[0] if module.endswith("_lora") else module[: -len(".lora_linear_layer")]
    return hint, module


def load_state_dict(path):
    """`(tensors, metadata)` of a .safetensors / .pt / .ckpt / .bin LoRA file."""
    from sdfast.io.checkpoint import read_checkpoint

    if not os.path.isfile(path):
        raise SdfastError(f"{path}: no such LoRA file")
    return read_checkpoint(path)


def family_of(state_dict):
    """"sdxl" when the names say so, else None (SD1 vs SD2 shows in the shapes, at merge)."""
    for key in state_dict:
        if key.startswith(_SDXL_PREFIXES) or _SDXL_UNET_HINT.match(key):
            return "sdxl"
    return None


def read_lora(source, unet, text_encoder, metadata=None):
    """Parse a LoRA (a path or a state dict) for these models. Raises SdfastError for files
    that are not LoRAs, SDXL LoRAs, and shapes that do not fit (a LoRA for the other family)."""
    if isinstance(source, (str, os.PathLike)):
        state_dict, metadata = load_state_dict(os.fspath(source))
        where = os.fspath(source)
    else:
        state_dict, metadata, where = source, dict(metadata or {}), "LoRA"
    if family_of(state_dict) == "sdxl":
        raise SdfastError(f"{where}: this LoRA is for SDXL (it names SDXL layers); the model is "
                          "SD1.x/SD2.x")
    groups, other = OrderedDict(), []
    for key, value in state_dict.items():
        split = _split(key)
        if split is None:
            other.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
    if not groups:
        raise SdfastError(f"{where}: no LoRA tensors (lora_down/lora_up, lora_A/lora_B, hada_*, "
                          "lokr_*) in this file")
    tables = {"unet": unet_targets(unet), "text_encoder": text_targets(text_encoder)}
    params = {"unet": dict(unet.named_parameters()),
              "text_encoder": dict(text_encoder.named_parameters())}
    modules, unmatched = [], list(other)
    for name, tensors in groups.items():
        hint, module = _normalise(name)
        target = None
        for component in ([hint] if hint else ["unet", "text_encoder"]):
            target = tables[component].get(module)
            if target is not None:
                break
        kind = _kind(tensors)
        if target is not None and kind is None:
            raise SdfastError(f"{where}: module {name} has no complete LoRA, LoHa or LoKr set of "
                              f"tensors (found: {', '.join(sorted(tensors))})")
        if target is None:
            unmatched.append(name)
            continue
        for key, value in tensors.items():
            # finite iff the float64 sum is (no float64 sum of finite floats overflows);
            # 4x faster than isfinite(...).all() on the fp16 tensors of most LoRA files
            if value.is_floating_point() and not math.isfinite(value.sum(dtype=torch.float64)):
                raise SdfastError(f"{where}: {name}.{key} holds NaN or infinite values")
        lora = LoraModule(name, target.component, target.param, target.rows, kind,
                          _tensors(kind, tensors), _alpha(tensors, f"{where}: {name}.alpha"))
        _check_shape(lora, params[target.component][target.param], where)
        modules.append(lora)
    return LoraFile(modules, unmatched, dict(metadata or {}))


def _kind(tensors):
    if any(k in tensors for k in _LORA_DOWN) and any(k in tensors for k in _LORA_UP):
        return "lora"
    if all(k in tensors for k in _LOHA[:4]):
        return "loha"
    if ("lokr_w1" in tensors or "lokr_w1_a" in tensors) and any(k.startswith("lokr_w2") for k in tensors):
        return "lokr"
    return None


def _tensors(kind, tensors):
    if kind != "lora":
        return {k: v for k, v in tensors.items() if k.startswith(("hada_", "lokr_"))}
    out = {"down": next(tensors[k] for k in _LORA_DOWN if k in tensors),
           "up": next(tensors[k] for k in _LORA_UP if k in tensors)}
    if "lora_mid.weight" in tensors:
        out["mid"] = tensors["lora_mid.weight"]
    return out


def _alpha(tensors, what="alpha"):
    alpha = tensors.get("alpha")
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise SdfastError(f"{what} has shape {list(alpha.shape)}; expected one number")
    return float(alpha.float().reshape(-1)[0])


def _target_shape(lora, weight):
    shape = tuple(weight.shape)
    if lora.rows is not None:
        shape = (lora.rows[1] - lora.rows[0], *shape[1:])
    return shape


def _check_shape(lora, weight, where):
    """The LoRA's product must have the weight's shape (1x1 convs and linears interchange)."""
    shape = _target_shape(lora, weight)
    t = lora.tensors
    if lora.kind == "lora":
        out, inner = t["up"].shape[0], t["down"][0].numel() if "mid" not in t else None
        if inner is None:
            inner = t["down"].shape[1] * t["mid"][0, 0].numel()
        ok = out == shape[0] and inner == int(torch.Size(shape[1:]).numel())
        found = f"{out}x{inner}"
    else:
        try:
            ok = lora.delta(shape).numel() == torch.Size(shape).numel()
        except RuntimeError:
            ok = False
        found = "a product"
    if not ok:
        want = f"{shape[0]}x{int(torch.Size(shape[1:]).numel())}"
        hint = ""
        if lora.component == "unet" and ("attn2.to_k" in lora.param or "attn2.to_v" in lora.param):
            hint = (" (this LoRA was made for a model with another text-encoder width: "
                    "an SD1.x LoRA on SD2.x or the reverse)")
        elif lora.component == "text_encoder":
            hint = " (this LoRA's text encoder is another width: an SD1.x LoRA on SD2.x or the reverse)"
        raise SdfastError(f"{where}: {lora.name} gives a {found} change for the {want} weight "
                          f"{lora.param}{hint}")


@dataclass
class Loaded:
    """A loaded LoRA: its file, strengths (UNet and text encoder) and parsed modules."""

    name: str
    path: str | None
    strength: float
    strength_clip: float
    lora: LoraFile

    def describe(self):
        return {"path": self.path, "strength": self.strength, "strength_clip": self.strength_clip,
                "modules": len(self.lora.modules)}


class LoraStack:
    """The LoRAs merged into one pipeline's weights (see the module docstring)."""

    def __init__(self, components, in_place=False):
        self._components = components          # {"unet": module, "text_encoder": module}
        self._params = {c: dict(m.named_parameters()) for c, m in components.items()}
        self._originals = {}                   # (component, param) -> original tensor copy
        # Writable copies of weights that no LoRA touches any more, kept for the next load
        # (a swap A -> B then maps no new memory) until `release_spares`.
        self._spares = {}                      # (component, param) -> tensor
        self.loaded = OrderedDict()            # name -> Loaded
        # In place: every parameter keeps its storage (a copy of the original is set aside
        # instead, and copied back on unload), so CUDA graphs captured before a swap see it.
        self.in_place = in_place

    def _weight(self, key):
        return self._params[key[0]][key[1]]

    def touched(self, loaded):
        return {(m.component, m.param) for m in loaded.lora.modules}

    def add(self, loaded):
        if loaded.name in self.loaded:
            raise SdfastError(f"a LoRA named {loaded.name!r} is already loaded")
        self.loaded[loaded.name] = loaded
        try:
            self.refresh(self.touched(loaded))
        except BaseException:
            del self.loaded[loaded.name]
            self.refresh(self.touched(loaded))
            raise

    def remove(self, name):
        loaded = self.loaded.pop(name)
        self.refresh(self.touched(loaded))

    def set_strength(self, name, strength, strength_clip):
        loaded = self.loaded[name]
        loaded.strength, loaded.strength_clip = float(strength), float(strength_clip)
        self.refresh(self.touched(loaded))

    @torch.no_grad()
    def refresh(self, keys):
        """Recompute each weight in `keys` from its original and the active LoRAs: every
        weight's low-rank LoRAs in one `lora_merge_` call over all of them (each weight written
        as original + LoRAs in one pass where it is recomputed whole), then the dense ones."""
        active = {}
        for loaded in self.loaded.values():
            for m in loaded.lora.modules:
                key = (m.component, m.param)
                if key in keys:
                    strength = loaded.strength if m.component == "unet" else loaded.strength_clip
                    active.setdefault(key, []).append((m, strength))
        low_rank, dense = [], []
        for key in sorted(keys):
            param = self._weight(key)
            if key not in active:                 # nothing applies any more: the original back
                if key in self._originals:
                    original = self._originals.pop(key)
                    if self.in_place:
                        param.data.copy_(original)
                    else:
                        self._spares[key] = param.data
                        param.data = original
                continue
            if key not in self._originals:        # first touch: keep the original untouched
                if self.in_place:
                    self._originals[key] = populated_copy(param.data)
                else:                             # (the loader's mmap stays as it is)
                    self._originals[key] = map_pages(param.data)
                    param.data = self._writable_like(key, param.data)
            original, weight = self._originals[key], param.data
            by_rows = _by_rows(active[key])
            if list(by_rows) == [None]:           # the whole weight: original + LoRAs
                self._split(weight, by_rows[None], original, low_rank, dense)
                continue
            weight.copy_(original)                # row blocks (a fused qkv): merged in place
            for rows, entries in by_rows.items():
                part = weight if rows is None else weight[rows[0]:rows[1]]
                self._split(part, entries, None, low_rank, dense)
        if low_rank:
            weights, ups, downs, scales, bases = map(list, zip(*low_rank))
            ops.lora_merge_(weights, ups, downs, scales, base=bases)
        for weight, entries in dense:
            _merge_dense(weight, entries)

    def _writable_like(self, key, original):
        """A tensor laid out as `original` to merge into: the spare this weight left at its
        last unload when it still fits (every element is rewritten by the merge), else new
        memory (`populated_empty_like`)."""
        spare = self._spares.pop(key, None)
        if spare is not None and (spare.shape, spare.stride(), spare.dtype, spare.device) == (
                original.shape, original.stride(), original.dtype, original.device):
            return spare
        return populated_empty_like(original)

    def release_spares(self):
        """Free the writable copies that unloading kept for the next load."""
        self._spares.clear()

    @staticmethod
    def _split(weight, entries, base, low_rank, dense):
        """Queue `(module, strength)` entries for `weight`: the low-rank ones as one
        lora_merge_ entry (weight = base + them, or in place with base None), the dense (LoHa
        / LoKr) ones for afterwards."""
        shape = tuple(weight.shape)
        ups, downs, scales, rest = [], [], [], []
        for m, strength in entries:
            if strength == 0:
                continue
            factors = m.factors(shape)
            if factors is None:
                rest.append((m, strength))
                continue
            up, down = factors
            ups.append(up.to(weight.device))
            downs.append(down.to(weight.device))
            scales.append(m.scale * strength)
        if ups or base is not None:
            low_rank.append((weight, ups, downs, scales, base))
        if rest:
            dense.append((weight, rest))


def _by_rows(entries):
    out = OrderedDict()
    for m, strength in entries:
        out.setdefault(m.rows, []).append((m, strength))
    return out


def _merge_dense(weight, entries):
    """Add the dense (LoHa / LoKr) `(module, strength)` entries to `weight`, in fp32."""
    shape = tuple(weight.shape)
    w32 = weight.float()
    for m, strength in entries:
        w32 += (m.scale * strength) * m.delta(shape).to(weight.device)
    weight.copy_(w32.to(weight.dtype))


__all__ = ["LoraModule", "LoraFile", "LoraStack", "Loaded", "read_lora", "load_state_dict",
           "family_of"]
