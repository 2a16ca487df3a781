"""The model registry: named specs of the three foundation models (docs/design.md §5).

Like segment_anything's ``sam_model_registry``, a name picks a spec and the spec's family picks a
builder. Real specs (the paper's ``ViT-L-14-336/openai``, ``vit_h``, ``dinov2_vitl14`` and a few
smaller siblings) load published weights (weights.py); miniature specs build the *same classes* --
open_clip ``CLIP``, segment_anything ``Sam``, transformers ``Dinov2Model`` /
``Dinov2WithRegistersModel`` -- with a few layers: ``mini-*`` with seeded random weights (tests),
``world-*`` trained on the demo world (demoworld/standins/; the demo profile), their small
files bundled with the project and retrained by ``fmbseg weights train-demo``.
The "sam" family holds two mask models behind one interface (components/models/masks.py):
segment_anything ``Sam`` (SAM v1) and transformers ``Sam2Model`` (SAM 2.1, ``mini-sam2.1``).
Architectures of the miniatures (and of DINOv2 and SAM 2.1, for random-weight benchmarks) are
JSON files in ``components/models/configs/``; one that names a transformers ``model_type`` is built
by transformers. Every builder returns a frozen model: ``eval()`` and
``requires_grad_(False)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import open_clip
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from transformers import (
    AutoConfig,
    AutoModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    Sam2Model,
    Sam3Config,
    Sam3Model,
)

from components.models.sam3 import SAM3_CONTEXT, SAM3_MEAN, SAM3_STD, Sam3Teacher
from components.models.sam_attention import use_sdpa_attention
from components.models.specs import FAMILIES, Family, ModelSpec, WeightFile
from components.models.weights import (
    MissingWeightsError,
    fetch_command,
    hub_cache_dir,
    load_state_dict,
    resolve_weight,
)

__all__ = [
    "ROLES",
    "ClipBundle",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "get_spec",
    "list_specs",
    "init_model",
    "build_clip",
    "build_sam",
    "build_dino",
    "build_teacher",
    "teacher_weights",
    "resolve_device",
    "autocast_context",
]

log = logging.getLogger(__name__)

# the role each family fills in the pipeline (the names users read in docs and checkpoints)
ROLES: dict[str, Family] = {"student": "dino", "text": "clip", "mask": "sam", "teacher": "teacher"}

OPENAI_MEAN: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_MEAN)
OPENAI_STD: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_STD)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CONFIG_DIR = Path(__file__).with_name("configs")


class ClipBundle(NamedTuple):
    """A frozen open_clip CLIP or CustomTextCLIP, its tokenizer (list[str] -> LongTensor [N, context])
    and its spec."""

    model: open_clip.CLIP | open_clip.CustomTextCLIP
    tokenizer: Callable[[list[str]], torch.Tensor]
    spec: ModelSpec


def _clip(name: str, arch: str, tag: str, *, image_size: int, patch_size: int, embed_dim: int) -> ModelSpec:
    file = WeightFile(
        names=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        local_dir=f"clip/{arch}-{tag}",
        hub_repo=open_clip.get_pretrained_cfg(arch, tag)["hf_hub"].strip("/"),
    )
    return ModelSpec(
        name=name,
        family="clip",
        miniature=False,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        architecture=arch,
        weights=(file,),
        pretrained_tag=tag,
    )


def _sam(key: str, checkpoint: str, *, sha256: str, size: int) -> ModelSpec:
    file = WeightFile(
        names=(checkpoint,),
        local_dir="sam",
        url=f"https://dl.fbaipublicfiles.com/segment_anything/{checkpoint}",
        sha256=sha256,
        size=size,
    )
    return ModelSpec(
        name=key,
        family="sam",
        miniature=False,
        image_size=1024,
        patch_size=16,
        embed_dim=256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        architecture=key,
        weights=(file,),
    )


STANDIN_DIR = Path(__file__).with_name("standins") / "weights"


def _mini(
    name: str, family: Family, *, image_size: int, patch_size: int, embed_dim: int, trained: bool = False
) -> ModelSpec:
    mean, std = (OPENAI_MEAN, OPENAI_STD) if family == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    prefix = _student_geometry(_read_json(f"{name}.json"))[2] if family == "dino" else 0
    file = f"{name}.safetensors"
    weights = (WeightFile(names=(file,), local_dir="world", bundled=STANDIN_DIR / file),) if trained else ()
    return ModelSpec(
        name=name,
        family=family,
        miniature=True,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        mean=mean,
        std=std,
        architecture=f"{name}.json",
        weights=weights,
        prefix_tokens=prefix,
    )


def _world(family: Family, *, trained: bool = True) -> ModelSpec:
    """The world stand-in of a family; its geometry is read from its architecture file.
    ``trained=False``: a seeded architecture whose random features suffice (measured: docs/demo-world.md)."""
    cfg = _read_json(f"world-{family}.json")
    if family == "clip":
        size, patch, dim = cfg["vision_cfg"]["image_size"], cfg["vision_cfg"]["patch_size"], cfg["embed_dim"]
    elif family == "sam":
        size, patch, dim = cfg["image_size"], cfg["patch_size"], cfg["prompt_embed_dim"]
    else:
        size, (patch, dim, _) = cfg["image_size"], _student_geometry(cfg)
    return _mini(f"world-{family}", family, image_size=size, patch_size=patch, embed_dim=dim, trained=trained)


# --- SAM 2.1 (the mask-model role; components/models/sam2.py) ---------------------------------
# transformers ``Sam2Model`` from the hub repo's config.json + model.safetensors. Their sha256 are
# not recorded here (no published list was at hand): None, like the other hub files. The
# miniature's config sets initializer_range 0.3: at transformers' default (0.02) a random Sam2Model
# predicts mask logits of about 1e-5 and IoUs of 0.5 for every prompt, which no filter separates.


def _sam2(name: str, repo: str) -> ModelSpec:
    """A SAM 2.1 size: image embedding 64 × 64 × 256 of a 1024 input (stride 16), ImageNet
    normalisation in its image processor; the architecture file serves random-weight benchmarks."""
    files = tuple(WeightFile(names=(n,), local_dir=f"sam/{name}", hub_repo=repo) for n in ("config.json", "model.safetensors"))
    frame = {"image_size": 1024, "patch_size": 16, "embed_dim": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return ModelSpec(name=name, family="sam", miniature=False, architecture=f"{name}.json", weights=files,
                     hub_repo=repo, licence="Apache-2.0", **frame)


SAM2_SPECS: tuple[ModelSpec, ...] = tuple(
    _sam2(f"sam2.1-hiera-{size}", f"facebook/sam2.1-hiera-{size}") for size in ("tiny", "small", "base-plus", "large")
)
# --- end SAM 2.1 ---------------------------------------------------------------------------------


def _read_json(architecture: str) -> dict[str, Any]:
    with open(CONFIG_DIR / architecture, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------- the student encoder
# Family "dino": the frozen ViT whose patch features the aligner maps into the text space (Stage 2,
# evaluation, predict). Its geometry -- patch side, width, prefix tokens (class + registers) -- is
# read from its architecture file in configs/ (for a real spec the same fields as the hub repo's
# config.json; build_dino checks the built model against the spec), so nothing downstream writes a
# patch size. sha256: the hub lists each file's hash, but these specs were written offline and
# record none (None: the file is not checked; DINOv2's specs recorded none either).
_DINOV2_LICENCE = "Apache-2.0"
_DINOV3_LICENCE = ("DINOv3 License (custom; gated on the hub: accept it on the model page, then download "
                   "with HF_TOKEN set)")
STUDENT_CLASSES: dict[str, str] = {
    "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel", "dinov3_vit": "DINOv3ViTModel",
}


def _student_geometry(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(patch side, width, prefix tokens = class token + registers) of a transformers config dict."""
    if cfg.get("model_type") not in STUDENT_CLASSES:
        raise ValueError(f"student model_type {cfg.get('model_type')!r}: supported {list(STUDENT_CLASSES)}")
    return cfg["patch_size"], cfg["hidden_size"], 1 + cfg.get("num_register_tokens", 0)


def _student(name: str, repo: str, *, image_size: int, licence: str, gated: bool = False) -> ModelSpec:
    """A published student: ``config.json`` + ``model.safetensors`` of hub ``repo``; geometry from
    ``configs/<repo name>.json``; ``image_size``: the default input side (a multiple of the patch)."""
    folder = repo.split("/")[1]
    patch, dim, prefix = _student_geometry(_read_json(f"{folder}.json"))
    files = tuple(
        WeightFile(names=(n,), local_dir=f"dino/{folder}", hub_repo=repo, gated=gated)
        for n in ("config.json", "model.safetensors")
    )
    return ModelSpec(
        name=name, family="dino", miniature=False, image_size=image_size, patch_size=patch, embed_dim=dim,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, architecture=f"{folder}.json", weights=files, hub_repo=repo,
        prefix_tokens=prefix, licence=licence,
    )


def _student_specs() -> tuple[ModelSpec, ...]:
    """DINOv2 (the paper's), DINOv2 with registers and DINOv3 (LVD-1689M; ImageNet statistics),
    then the miniatures of each class (seeded random weights) and the demo world's."""
    v3 = "facebook/dinov3-vit{}-pretrain-lvd1689m"
    reg = "facebook/dinov2-with-registers-{}"
    v2, v3_side = dict(image_size=518, licence=_DINOV2_LICENCE), dict(image_size=512, licence=_DINOV3_LICENCE, gated=True)
    return (
        _student("dinov2_vitl14", "facebook/dinov2-large", **v2),
        _student("dinov2_vitb14", "facebook/dinov2-base", **v2),
        _student("dinov2_vits14_reg", reg.format("small"), **v2),
        _student("dinov2_vitb14_reg", reg.format("base"), **v2),
        _student("dinov2_vitl14_reg", reg.format("large"), **v2),
        _student("dinov2_vitg14_reg", reg.format("giant"), **v2),
        _student("dinov3_vits16", v3.format("s16"), **v3_side),
        _student("dinov3_vitb16", v3.format("b16"), **v3_side),
        _student("dinov3_vitl16", v3.format("l16"), **v3_side),
        _student("dinov3_vith16plus", v3.format("h16plus"), **v3_side),
        _mini_student("mini-dino"),
        _mini_student("mini-dino-reg"),
        _mini_student("mini-dinov3"),
        _world("dino", trained=False),
    )


def _mini_student(name: str) -> ModelSpec:
    cfg = _read_json(f"{name}.json")
    patch, dim, _ = _student_geometry(cfg)
    return _mini(name, "dino", image_size=cfg["image_size"], patch_size=patch, embed_dim=dim)



# ------------------------------------------------------------------------------ the text space
# Family "clip": an open_clip model whose text tower makes the prototypes (Stage 1 detection,
# Stage 2) and whose vision tower Stage 1's dense detection runs (components/models/clip_dense.py:
# a class-token ViT with an output projection -- OpenAI CLIP, MetaCLIP 2; the timm towers with an
# attention-pool head, SigLIP 2 and PE-Core, serve Stage 2 only). Geometry and normalisation come
# from open_clip's own model and pretrained configs. MetaCLIP 2's and SigLIP 2's tokenizers are
# Hugging Face tokenizers (XLM-V, Gemma), fetched with the weights; the toy configs ``mini-metaclip2``
# and ``mini-siglip2`` keep the architectures' classes (CLIP; CustomTextCLIP with a timm attention-
# pool tower) at a few layers, and the OpenAI BPE tokenizer so that they build offline.
def _text(name: str, arch: str, tag: str, *, licence: str) -> ModelSpec:
    cfg, pretrained = open_clip.get_model_config(arch), open_clip.get_pretrained_cfg(arch, tag)
    vision = cfg["vision_cfg"]
    patch = vision["patch_size"] if "patch_size" in vision else _timm_patch(vision["timm_model_name"])
    file = WeightFile(names=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), local_dir=f"clip/{arch}-{tag}",
                      hub_repo=pretrained["hf_hub"].strip("/"))
    return ModelSpec(
        name=name, family="clip", miniature=False, image_size=vision["image_size"], patch_size=patch,
        embed_dim=cfg["embed_dim"], mean=tuple(pretrained["mean"]), std=tuple(pretrained["std"]), architecture=arch,
        weights=(file,), pretrained_tag=tag, licence=licence,
    )


def _timm_patch(timm_name: str) -> int:
    """The patch side written in a timm ViT's name (``vit_large_patch16_siglip_384`` -> 16)."""
    found = re.search(r"patch(\d+)", timm_name)
    if found is None:
        raise ValueError(f"no patch size in the timm model name {timm_name!r}")
    return int(found.group(1))


def _text_specs() -> tuple[ModelSpec, ...]:
    """MetaCLIP 2, PE-Core and SigLIP 2 (licences as their model cards state them), then toy
    configs of MetaCLIP 2's and SigLIP 2's classes."""
    mini = [_read_json(f"{n}.json") for n in ("mini-metaclip2", "mini-siglip2")]
    return (
        _text("ViT-H-14-worldwide/metaclip2_worldwide", "ViT-H-14-worldwide", "metaclip2_worldwide",
              licence="CC-BY-NC-4.0 (MetaCLIP 2 model card; non-commercial)"),
        _text("PE-Core-L-14-336/meta", "PE-Core-L-14-336", "meta", licence="Apache-2.0 (Perception Encoder model card)"),
        _text("ViT-L-16-SigLIP2-384/webli", "ViT-L-16-SigLIP2-384", "webli", licence="Apache-2.0 (SigLIP 2 model card)"),
        _mini("mini-metaclip2", "clip", image_size=mini[0]["vision_cfg"]["image_size"],
              patch_size=mini[0]["vision_cfg"]["patch_size"], embed_dim=mini[0]["embed_dim"]),
        _mini("mini-siglip2", "clip", image_size=mini[1]["vision_cfg"]["image_size"],
              patch_size=mini[1]["vision_cfg"]["patch_size"],
              embed_dim=mini[1]["embed_dim"]),
    )


def dense_text_specs() -> list[str]:
    """The text-space specs whose vision tower Stage 1's dense detection runs: a class-token ViT
    with an output projection (open_clip's own VisionTransformer; not a timm tower)."""
    return [n for n in list_specs("clip") if "timm_model_name" not in _clip_config(get_spec(n))["vision_cfg"]]


def _clip_config(spec: ModelSpec) -> dict[str, Any]:
    """The open_clip model config of a text-space spec (a copy)."""
    return _read_config(spec) if spec.miniature else open_clip.get_model_config(spec.architecture)


def _open_clip_model(cfg: dict[str, Any]) -> open_clip.CLIP | open_clip.CustomTextCLIP:
    """open_clip's model class of a config, as its factory picks it (``custom_text`` -> CustomTextCLIP)."""
    cfg = dict(cfg)
    return (open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP)(**cfg)


# sha256 and sizes of the SAM checkpoints: as published alongside the files and recorded by many
# downstream projects (the segment-anything README lists only the URLs).
_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _clip("ViT-L-14-336/openai", "ViT-L-14-336", "openai", image_size=336, patch_size=14, embed_dim=768),
        _clip("ViT-B-16/openai", "ViT-B-16", "openai", image_size=224, patch_size=16, embed_dim=512),
        _mini("mini-clip", "clip", image_size=64, patch_size=16, embed_dim=32),
        _world("clip"),
        _sam(
            "vit_h",
            "sam_vit_h_4b8939.pth",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size=2564550879,
        ),
        _sam(
            "vit_l",
            "sam_vit_l_0b3195.pth",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size=1249524607,
        ),
        _sam(
            "vit_b",
            "sam_vit_b_01ec64.pth",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size=375042383,
        ),
        *SAM2_SPECS,
        _mini("mini-sam", "sam", image_size=128, patch_size=16, embed_dim=32),
        _mini("mini-sam2.1", "sam", image_size=128, patch_size=16, embed_dim=32),
        _world("sam"),
        *_student_specs(),
        *_text_specs(),
    )
}


# ------------------------------------------------------------------------- the concept teacher
SAM3_LICENCE_PAGE = "https://huggingface.co/facebook/sam3"


def _teacher(name: str, repo: str) -> ModelSpec:
    """SAM 3 (transformers ``Sam3Model``): its hub repo's config.json + model.safetensors. Gated:
    the hub serves the files only to an account that accepted the SAM License, so no sha256 is
    recorded (the hub pins each file by its LFS hash; there is no public copy to hash here)."""
    folder = repo.split("/")[1]
    files = tuple(
        WeightFile(names=(n,), local_dir=f"teacher/{folder}", hub_repo=repo, sha256=None, gated=True)
        for n in ("config.json", "model.safetensors")
    )
    return ModelSpec(
        name=name,
        family="teacher",
        miniature=False,
        image_size=1008,
        patch_size=14,
        embed_dim=256,
        mean=SAM3_MEAN,
        std=SAM3_STD,
        architecture=f"{folder}.json",
        weights=files,
        hub_repo=repo,
        licence="SAM License",
    )


def _mini_teacher(name: str) -> ModelSpec:
    """A miniature ``Sam3Model`` from ``configs/<name>.json`` with seeded random weights."""
    with open(CONFIG_DIR / f"{name}.json", encoding="utf-8") as f:
        cfg = json.load(f)
    backbone = cfg["vision_config"]["backbone_config"]
    return replace(
        _mini(name, "teacher", image_size=backbone["image_size"], patch_size=backbone["patch_size"],
              embed_dim=cfg["vision_config"]["fpn_hidden_size"]),
        mean=SAM3_MEAN,
        std=SAM3_STD,
    )


_SPECS.update({spec.name: spec for spec in (_teacher("sam3", "facebook/sam3"), _mini_teacher("mini-sam3"))})


def get_spec(name: str) -> ModelSpec:
    """The spec called ``name``; an unknown name raises KeyError listing the known ones."""
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown model spec {name!r}; known specs: {', '.join(_SPECS)}") from None


def list_specs(family: Family | str | None = None) -> list[str]:
    """Names of all specs, or of one family ("clip" | "sam" | "dino") or role ("text" | "mask" |
    "student"), in registry order."""
    family = ROLES.get(family, family) if family is not None else None
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; families: {', '.join(FAMILIES)} "
                         f"(roles: {', '.join(ROLES)})")
    return [name for name, spec in _SPECS.items() if family is None or spec.family == family]


def _spec_of(name: str, family: Family) -> ModelSpec:
    spec = get_spec(name)
    if spec.family != family:
        raise ValueError(f"model spec {name!r} is a {spec.family} model, not {family}: {list_specs(family)}")
    return spec


def _read_config(spec: ModelSpec) -> dict[str, Any]:
    with open(CONFIG_DIR / spec.architecture, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic random init that leaves the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _frozen(model: torch.nn.Module, device: str | torch.device) -> Any:
    model.eval().requires_grad_(False)
    return model.to(resolve_device(device) if isinstance(device, str) else device)


def _warn_random(spec: ModelSpec) -> None:
    log.warning("model %r built with RANDOM weights (random_weights=True): benchmarks only", spec.name)


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer(context_length=context_length)


def init_model(name: str) -> torch.nn.Module:
    """The seeded random init of a miniature spec's architecture (or of a real DINOv2's), in train
    mode with gradients on: what ``mini-*`` specs run with and what the stand-ins train from."""
    spec = get_spec(name)
    if not spec.miniature and not _from_transformers(spec):
        raise ValueError(f"{name!r} is a real {spec.family} spec; it has no seeded init (use build_{spec.family})")
    cfg = _read_config(spec)
    with _seeded(spec.seed):
        if "model_type" in cfg:  # a transformers architecture: DINOv2, SAM 2.1
            return AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        if spec.family == "clip":
            return _open_clip_model(cfg)
        if spec.family == "teacher":
            return Sam3Model(Sam3Config(**cfg))
        return _build_mini_sam(cfg)


def _from_transformers(spec: ModelSpec) -> bool:
    """Whether a spec's architecture is a transformers config (a JSON file naming a model_type)."""
    return spec.architecture.endswith(".json") and "model_type" in _read_config(spec)


def _transformers_model(
    spec: ModelSpec, weights_dir: str | os.PathLike[str] | None, random_weights: bool
) -> torch.nn.Module:
    """A transformers model of a spec: a miniature's seeded init, the architecture with random
    weights (benchmarks only), or the hub repo's ``config.json`` + ``model.safetensors``, every
    weight from the file (a missing or mismatched key is an error, never a random init)."""
    if spec.miniature:
        return _miniature(spec, weights_dir)
    if random_weights:
        _warn_random(spec)
        return init_model(spec.name)
    config_path, weights_path = (resolve_weight(spec.name, f, weights_dir) for f in spec.weights)
    return _from_pretrained(spec, config_path, weights_path)


def _from_pretrained(spec: ModelSpec, config_path: Path, weights_path: Path, model_class: Any = AutoModel,
                     config_class: Any = AutoConfig) -> torch.nn.Module:
    """A transformers model from a hub repo's ``config.json`` + ``model.safetensors`` on disk, every
    weight from the file: a missing or mismatched key is an error naming the spec, never a random init."""
    model, info = model_class.from_pretrained(
        str(weights_path.parent),
        config=config_class.from_pretrained(str(config_path)),
        local_files_only=True,
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys", "error_msgs")}
    if bad:
        raise ValueError(f"{weights_path} does not fit {spec.name} ({spec.hub_repo}): {bad}")
    return model


def _miniature(spec: ModelSpec, weights_dir: str | os.PathLike[str] | None) -> torch.nn.Module:
    """A miniature: its seeded init, plus its trained file for a world stand-in."""
    model = init_model(spec.name)
    if spec.weights:
        from components.models.standins.store import load_trained

        load_trained(model, resolve_weight(spec.name, spec.weights[0], weights_dir))
    return model


def build_clip(
    name: str,
    *,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
) -> ClipBundle:
    """A frozen open_clip ``CLIP`` (``CustomTextCLIP`` for SigLIP 2 and PE-Core) with its tokenizer.

    ``random_weights=True`` builds a real architecture with random weights -- for benchmarks only,
    never for results. Miniatures always get their seeded weights.
    """
    spec = _spec_of(name, "clip")
    tokenizer = _text_tokenizer(spec)  # a missing Hugging Face tokenizer fails before the model builds
    if spec.miniature:
        model = _miniature(spec, weights_dir)
    else:
        path = None if random_weights else resolve_weight(name, spec.weights[0], weights_dir)
        cfg = open_clip.get_model_config(spec.architecture)
        cfg["quick_gelu"] = open_clip.get_pretrained_cfg(spec.architecture, spec.pretrained_tag).get(
            "quick_gelu", False
        )
        model = _open_clip_model(cfg)
        if path is None:
            _warn_random(spec)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    return ClipBundle(_frozen(model, device), tokenizer, spec)


def _text_tokenizer(spec: ModelSpec) -> Callable[[list[str]], torch.Tensor]:
    """The spec's tokenizer: open_clip's OpenAI BPE, or the Hugging Face tokenizer its config names
    (MetaCLIP 2, SigLIP 2), read from the hub cache only (fetched with the weights)."""
    text_cfg = _clip_config(spec)["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return _tokenizer(context_length)
    from open_clip.tokenizer import HFTokenizer

    try:
        return HFTokenizer(hf_name, context_length=context_length, cache_dir=str(hub_cache_dir()),
                           local_files_only=True, **text_cfg.get("tokenizer_kwargs", {}))
    except OSError:
        raise MissingWeightsError(
            f"missing the tokenizer of model spec {spec.name!r}: the Hugging Face tokenizer {hf_name!r} is not in "
            f"the hub cache {hub_cache_dir()}.\nFetch it with:  {fetch_command(spec.name)}"
        ) from None


def _build_mini_sam(cfg: dict[str, Any]) -> Sam:
    """segment_anything's classes composed as its ``build_sam.py`` does, at miniature size."""
    size, patch, dim = cfg["image_size"], cfg["patch_size"], cfg["prompt_embed_dim"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=size,
            patch_size=patch,
            embed_dim=cfg["encoder_embed_dim"],
            depth=cfg["encoder_depth"],
            num_heads=cfg["encoder_num_heads"],
            mlp_ratio=4,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg["window_size"],
            global_attn_indexes=tuple(cfg["encoder_global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size),
            mask_in_chans=cfg["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
        pixel_mean=[255 * m for m in IMAGENET_MEAN],
        pixel_std=[255 * s for s in IMAGENET_STD],
    )


def build_sam(
    name: str,
    *,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
) -> Sam | Sam2Model:
    """A frozen mask model: a segment_anything ``Sam`` whose image-encoder attention runs through
    ``F.scaled_dot_product_attention`` (components/models/sam_attention.py; same outputs), or for
    the SAM 2.1 specs a transformers ``Sam2Model`` (hub ``config.json`` + ``model.safetensors``).
    Either goes to components.models.masks.embed_image.

    ``random_weights=True`` builds a real architecture with random weights -- for benchmarks only.
    """
    spec = _spec_of(name, "sam")
    if _from_transformers(spec):
        return _frozen(_transformers_model(spec, weights_dir, random_weights), device)
    if spec.miniature:
        sam = _miniature(spec, weights_dir)
    else:
        state = (
            None if random_weights else load_state_dict(resolve_weight(name, spec.weights[0], weights_dir))
        )
        sam = sam_model_registry[spec.architecture](checkpoint=None)
        if state is None:
            _warn_random(spec)
        else:
            sam.load_state_dict(state, strict=True)
    use_sdpa_attention(sam.image_encoder)  # the same attention through PyTorch's fused kernels
    return _frozen(sam, device)


def build_dino(
    name: str,
    *,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
) -> Dinov2Model | Dinov2WithRegistersModel | DINOv3ViTModel:
    """A frozen student encoder: transformers ``Dinov2Model``, ``Dinov2WithRegistersModel`` or
    ``DINOv3ViTModel`` (the spec's architecture picks it).

    Real specs load the hub repo's ``config.json`` + ``model.safetensors``; every weight of the
    model must come from the file (a missing or mismatched key is an error, never a random init).
    ``random_weights=True`` builds the architecture with random weights -- for benchmarks only.
    """
    spec = _spec_of(name, "dino")
    model = _transformers_model(spec, weights_dir, random_weights)
    built = _student_geometry(model.config.to_dict())
    if built != (spec.patch_size, spec.embed_dim, spec.prefix_tokens):
        raise ValueError(
            f"{spec.name}: built patch_size / hidden_size / prefix tokens {built}, spec says "
            f"{(spec.patch_size, spec.embed_dim, spec.prefix_tokens)}"
        )
    return _frozen(model, device)


def teacher_weights(name: str, weights_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The files a teacher spec loads (none for a miniature). Absent gated files raise a one-line
    :class:`MissingWeightsError` that names the licence page, HF_TOKEN and the fetch command."""
    spec = _spec_of(name, "teacher")
    try:
        return [resolve_weight(name, f, weights_dir) for f in spec.weights]
    except MissingWeightsError:
        raise MissingWeightsError(
            f"{name}: the gated weights of {spec.hub_repo} are not on disk: accept the {spec.licence} at "
            f"{SAM3_LICENCE_PAGE}, set HF_TOKEN to a token of that account, then run `fmbseg weights fetch {name}`"
        ) from None


def build_teacher(
    name: str,
    *,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
) -> Sam3Teacher:
    """The frozen SAM 3 concept teacher (components/models/sam3.py) with the CLIP BPE tokenizer.

    A real spec loads its hub repo's config.json + model.safetensors, every weight from the file.
    Its files are gated: when one is absent, :class:`MissingWeightsError` says in one line where
    to accept the licence and how to fetch them, before any model is built.
    ``random_weights=True`` builds ``facebook/sam3``'s architecture (transformers' default
    ``Sam3Config``) with random weights -- for benchmarks only.
    """
    spec = _spec_of(name, "teacher")
    if spec.miniature:
        model = _miniature(spec, weights_dir)
    elif random_weights:
        with _seeded(spec.seed):
            model = Sam3Model(Sam3Config())
        _warn_random(spec)
    else:
        config_path, weights_path = teacher_weights(name, weights_dir)
        model = _from_pretrained(spec, config_path, weights_path, Sam3Model, Sam3Config)
    model = _frozen(model, device)
    return Sam3Teacher(model, _tokenizer(SAM3_CONTEXT), image_size=model.config.vision_config.backbone_config.image_size)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given.

    Asking for cuda on a machine without it is an error, not a silent CPU run.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


_AUTOCAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(
    device: str | torch.device, dtype: Literal["fp32", "bf16", "fp16"]
) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for model forwards: ``torch.autocast`` on cuda for bf16/fp16; a no-op for
    fp32 and on the CPU (which always runs fp32)."""
    if dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; supported: {', '.join(_AUTOCAST_DTYPES)}")
    device = torch.device(device)
    if dtype == "fp32" or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[dtype])
