"""The sampler registry: ComfyUI's sampler names -> `sample_<name>` functions."""
from . import samplers as _s
from .uni_pc import sample_uni_pc, sample_uni_pc_bh2

SAMPLERS = {
    "euler": _s.sample_euler,
    "euler_ancestral": _s.sample_euler_ancestral,
    "heun": _s.sample_heun,
    "dpm_2": _s.sample_dpm_2,
    "dpm_2_ancestral": _s.sample_dpm_2_ancestral,
    "lms": _s.sample_lms,
    "dpmpp_2s_ancestral": _s.sample_dpmpp_2s_ancestral,
    "dpmpp_sde": _s.sample_dpmpp_sde,
    "dpmpp_2m": _s.sample_dpmpp_2m,
    "dpmpp_2m_sde": _s.sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": _s.sample_dpmpp_3m_sde,
    "ddim": _s.sample_ddim,
    "ddpm": _s.sample_ddpm,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    "lcm": _s.sample_lcm,
}


def get_sampler(name):
    """The sampler function registered under `name`; ValueError listing the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
