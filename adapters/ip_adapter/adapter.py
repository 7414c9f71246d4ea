"""IP-Adapter: image prompts through extra key/value projections in cross-attention.

Each cross-attention layer computes ``Attn(Q, K_text, V_text) + scale * Attn(Q, K_img,
V_img)``, where the image tokens come from a small projection of a frozen CLIP image
encoder's output. condkit attaches exactly what diffusers' ``load_ip_adapter`` does
(``UNet2DConditionLoadersMixin._load_ip_adapter_weights``): ``IPAdapterAttnProcessor2_0``
on the cross-attention layers through ``unet.set_attn_processor``, the image projection
as ``unet.encoder_hid_proj = MultiIPAdapterImageProjection([...])`` and
``encoder_hid_dim_type = "ip_image_proj"``; the U-Net then takes the raw encoder output
as ``added_cond_kwargs={"image_embeds": [embeds]}``. So what condkit trains is what
diffusers runs, and the export loads there unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter, GenerateInput, SampleInput
from condkit.adapters.ip_adapter import formats
from condkit.adapters.ip_adapter.config import IPAdapterConfig
from condkit.errors import UserError
from condkit.io import save_safetensors_atomic

IMAGE_EMBEDS_KEY = "ip_image_embeds"
IP_IMAGE_PROJ = "ip_image_proj"


def images_to_uint8(images) -> list[np.ndarray]:
    """Reference images as (H, W, 3) uint8 arrays, the input CLIPImageProcessor expects.

    Args:
        images: a (b, 3, H, W) float tensor in [0, 1], or a list of PIL images / arrays.
    """
    if isinstance(images, torch.Tensor):
        # (b, 3, H, W) [0, 1] -> (b, H, W, 3) uint8; data loaders make these from 8-bit
        # files, so this round trip is exact and training sees what inference sees.
        array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return list(array.permute(0, 2, 3, 1).cpu().numpy())
    return [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3] for image in images]


@torch.no_grad()
def encode_images(images, image_encoder, feature_extractor, hidden_states: bool) -> torch.Tensor:
    """Encode images with the frozen CLIP image encoder, as diffusers' pipelines do.

    Args:
        images: see :func:`images_to_uint8`.
        image_encoder: a ``CLIPVisionModelWithProjection``.
        feature_extractor: its ``CLIPImageProcessor``.
        hidden_states: the penultimate hidden states (plus variant) instead of ``image_embeds``.

    Returns:
        (b, projection_dim) ``image_embeds``, or (b, seq, hidden) hidden states.
    """
    pixels = feature_extractor(images_to_uint8(images), return_tensors="pt").pixel_values
    parameter = next(image_encoder.parameters())
    pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
    if hidden_states:
        return image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return image_encoder(pixels).image_embeds


class IPAdapter(Adapter):
    """An IP-Adapter on a base U-Net (one per base).

    Args:
        config: the adapter config.
        name: instance name.
    """

    kind = "ip_adapter"
    config_class = IPAdapterConfig
    # The reference image of each training sample: from metadata.jsonl, or a folder the
    # recipe's data.reference names; the image itself when a sample has none.
    sample_inputs = (
        SampleInput(
            name="reference",
            label="reference image",
            columns=("reference_file_name", "reference"),
            folder_key="reference",
            folder_help="folder of reference images matched by file stem (IP-Adapter); default: the image itself",
            aligned=False,
            default_to_image=True,
        ),
    )
    generate_inputs = (
        GenerateInput(option="--ip-image", key="ip_images", help="reference image for each IP-Adapter, in --adapter order", label="IP-Adapter"),
    )

    def __init__(self, config: IPAdapterConfig, name: str = "default") -> None:
        super().__init__(config, name)
        self.image_encoder = None
        self.feature_extractor = None
        self.image_projection: torch.nn.Module | None = None
        self.processors: dict[str, torch.nn.Module] = {}  # cross-attention processor name -> IP processor
        self._original_processors: dict[str, Any] = {}
        self._original_hid_proj = None
        self._original_hid_dim_type = None
        self._uncond_embeds: torch.Tensor | None = None  # (1, ...) what a dropped image encodes to

    # ---- attach and detach -------------------------------------------------------
    def attach(self, base) -> None:
        """Attach to ``base.unet`` the way diffusers' ``load_ip_adapter`` does.

        New adapters get a fresh projection and ``to_k_ip``/``to_v_ip`` copied from each
        layer's ``to_k``/``to_v`` (the image branch starts as a second text branch);
        loaded ones bring their weights.

        Raises:
            UserError: the U-Net already carries an ``encoder_hid_proj`` (e.g. another
                IP-Adapter), or no image encoder is available.
        """
        self.check_unattached()
        unet = base.unet
        if unet.encoder_hid_proj is not None or unet.config.encoder_hid_dim_type is not None:
            raise UserError(
                f"IP-Adapter {self.name!r}: the U-Net already has an encoder_hid_proj "
                f"({unet.config.encoder_hid_dim_type}); condkit attaches one IP-Adapter per base"
            )
        self._resolve_image_encoder(base)
        if self.image_projection is None:
            self.image_projection = self._new_projection(unet)
            self.processors = self._new_processors(unet)
        self._check_embed_dim()
        parameter = next(unet.parameters())
        self.image_projection.to(device=parameter.device, dtype=parameter.dtype)

        self._original_processors = dict(unet.attn_processors)
        self._original_hid_proj = unet.encoder_hid_proj
        self._original_hid_dim_type = unet.config.encoder_hid_dim_type
        processors = dict(self._original_processors)
        processors.update(self.processors)
        unet.set_attn_processor(processors)
        for processor in self.processors.values():
            processor.to(device=parameter.device, dtype=parameter.dtype)
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.image_projection])
        # diffusers sets the FrozenDict attribute the same way; detach restores it.
        unet.config.encoder_hid_dim_type = IP_IMAGE_PROJ
        self.base = base
        self._uncond_embeds = self._encode_uncond()
        self.set_scale(self.config.scale)

    def detach(self) -> None:
        """Restore the original processors, ``encoder_hid_proj`` and config value."""
        if self.base is None:
            return
        unet = self.base.unet
        unet.encoder_hid_proj = self._original_hid_proj
        unet.config.encoder_hid_dim_type = self._original_hid_dim_type
        unet.set_attn_processor(self._original_processors)
        self._original_processors = {}
        self.base = None

    def set_scale(self, scale: float) -> None:
        """Set the global strength; ``config.layer_scales`` still shapes it per layer.

        Args:
            scale: 0 gives the base's own output exactly (diffusers skips the branch).
        """
        per_layer = self._layer_scales()
        for name, processor in self.processors.items():
            factor = next((value for prefix, value in per_layer.items() if name.startswith(prefix)), 1.0)
            processor.scale = [float(scale) * float(factor)]

    def _layer_scales(self) -> dict[str, float]:
        """``config.layer_scales`` expanded to layer-name prefixes, with diffusers' own helper."""
        if not self.config.layer_scales:
            return {}
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

        try:
            return _maybe_expand_lora_scales(self.base.unet, [dict(self.config.layer_scales)], default_scale=0.0)[0]
        except ValueError as exc:
            raise UserError(f"adapter.layer_scales: {exc}") from None

    # ---- building ----------------------------------------------------------------
    def _resolve_image_encoder(self, base) -> None:
        if self.config.image_encoder:
            folder = Path(self.config.image_encoder)
            if not (folder / "config.json").is_file():
                raise UserError(f"adapter.image_encoder = {str(folder)!r}: not a CLIPVisionModelWithProjection folder (no config.json)")
            # formats.load_image_encoder names a truncated or pickled weight file in one line
            self.image_encoder, processor = formats.load_image_encoder(folder)
            self.feature_extractor = processor or self.feature_extractor
        if self.image_encoder is None:
            self.image_encoder = base.image_encoder
        if self.image_encoder is None:
            raise UserError(
                f"base {base.source}: has no image_encoder folder; set adapter.image_encoder to a local "
                "CLIPVisionModelWithProjection folder"
            )
        if self.feature_extractor is None:
            self.feature_extractor = base.feature_extractor or _default_image_processor(self.image_encoder)
        self.image_encoder.requires_grad_(False)
        self.image_encoder.eval()

    def _image_embed_dim(self) -> int:
        cfg = self.image_encoder.config
        return cfg.projection_dim if self.config.variant == "base" else cfg.hidden_size

    def _new_projection(self, unet) -> torch.nn.Module:
        from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

        cross_dim = unet.config.cross_attention_dim
        if self.config.variant == "base":
            return ImageProjection(image_embed_dim=self._image_embed_dim(), cross_attention_dim=cross_dim, num_image_text_embeds=self.config.tokens)
        # diffusers rebuilds a plus resampler from a file with depth 4, dim_head 64 and
        # heads = to_q rows // 64, so condkit builds it that way (as the original did).
        if cross_dim % 64:
            raise UserError(f"adapter.variant = plus needs a cross_attention_dim divisible by 64, the base has {cross_dim}")
        return IPAdapterPlusImageProjection(
            embed_dims=self._image_embed_dim(),
            output_dims=cross_dim,
            hidden_dims=cross_dim,
            depth=4,
            dim_head=64,
            heads=cross_dim // 64,
            num_queries=self.config.tokens,
        )

    def _new_processors(self, unet) -> dict[str, torch.nn.Module]:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        processors = {}
        for name in formats.cross_attention_names(unet):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            to_k, to_v = _base_linear(attn.to_k), _base_linear(attn.to_v)
            processor = IPAdapterAttnProcessor2_0(
                hidden_size=to_k.out_features,
                cross_attention_dim=to_k.in_features,
                scale=self.config.scale,
                num_tokens=(self.config.tokens,),
            )
            with torch.no_grad():
                processor.to_k_ip[0].weight.copy_(to_k.weight)
                processor.to_v_ip[0].weight.copy_(to_v.weight)
            processors[name] = processor
        return processors

    def _check_embed_dim(self) -> None:
        from diffusers.models.embeddings import ImageProjection

        projection = self.image_projection
        expected = projection.image_embeds.in_features if isinstance(projection, ImageProjection) else projection.proj_in.in_features
        if expected != self._image_embed_dim():
            what = "projection_dim" if self.config.variant == "base" else "hidden_size"
            raise UserError(
                f"IP-Adapter {self.name!r}: its projection takes {expected}-dim image features but the image encoder's "
                f"{what} is {self._image_embed_dim()} (a different image encoder?)"
            )

    @torch.no_grad()
    def _encode_uncond(self) -> torch.Tensor:
        """What a dropped image encodes to, as diffusers' ``encode_image`` builds the negative.

        Base: a zero ``image_embeds``; plus: the hidden states of an all-zero pixel input.
        """
        size = self.image_encoder.config.image_size
        parameter = next(self.image_encoder.parameters())
        if self.config.variant == "base":
            return torch.zeros(1, self.image_encoder.config.projection_dim, device=parameter.device, dtype=parameter.dtype)
        zeros = torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype)
        return self.image_encoder(zeros, output_hidden_states=True).hidden_states[-2]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The image projection and every layer's ``to_k_ip``/``to_v_ip`` (nothing else trains)."""
        params = list(self.image_projection.parameters())
        for processor in self.processors.values():
            params += list(processor.parameters())
        for param in params:  # base.freeze() may have run after attach
            param.requires_grad_(True)
        return params

    # ---- training hooks ----------------------------------------------------------
    def encode_extras(self, batch: dict[str, Any], base) -> dict[str, torch.Tensor]:
        """Encode each sample's reference image (default: the target image itself).

        Returns:
            ``{"ip_image_embeds": (b, projection_dim)}`` (base) or ``(b, seq, hidden)``
            penultimate hidden states (plus): the frozen encoder's output, cacheable.
        """
        reference = batch.get("reference")
        if reference is None:
            reference = (batch["pixel_values"] + 1) / 2  # (b, 3, H, W) [-1, 1] -> [0, 1]
        hidden = self.config.variant == "plus"
        return {IMAGE_EMBEDS_KEY: encode_images(reference, self.image_encoder, self.feature_extractor, hidden)}

    def drop_conditions(self, conditioning, extras, empty_conditioning, caption_dropout, generator):
        """Drop the image, the caption or both, per sample (``drop_image/text/both``).

        One uniform draw per sample picks the case, so the three are exclusive. A dropped
        image becomes what diffusers feeds as the negative image at inference (zeros for
        base). ``caption_dropout`` is not used: the config's probabilities replace it.
        """
        cfg = self.config
        draw = torch.rand(conditioning.batch_size, generator=generator)  # (b,)
        drop_image_only = draw < cfg.drop_image
        drop_text_only = (draw >= cfg.drop_image) & (draw < cfg.drop_image + cfg.drop_text)
        drop_both = (draw >= cfg.drop_image + cfg.drop_text) & (draw < cfg.drop_image + cfg.drop_text + cfg.drop_both)
        conditioning = conditioning.where(drop_text_only | drop_both, empty_conditioning)
        embeds = extras[IMAGE_EMBEDS_KEY]
        drop_image = (drop_image_only | drop_both).to(embeds.device).view(-1, *([1] * (embeds.ndim - 1)))
        uncond = self._uncond_embeds.to(device=embeds.device, dtype=embeds.dtype)
        return conditioning, {**extras, IMAGE_EMBEDS_KEY: torch.where(drop_image, uncond, embeds)}

    def unet_kwargs(self, noisy_latents, timesteps, text_embeds, extras) -> dict[str, Any]:
        """``added_cond_kwargs={"image_embeds": [(b, 1, ...)]}``: one list entry per IP-Adapter,
        one reference image each; the U-Net's ``encoder_hid_proj`` projects it."""
        return {"added_cond_kwargs": {"image_embeds": [extras[IMAGE_EMBEDS_KEY].unsqueeze(1)]}}

    @classmethod
    def combine_unet_kwarg(cls, key: str, first: Any, second: Any) -> Any:
        """Several IP-Adapters' image embeddings side by side: one list entry per IP-Adapter
        (diffusers' convention for ``added_cond_kwargs["image_embeds"]``).

        Args:
            key: ``added_cond_kwargs.image_embeds``.
            first: the list so far, entries (b, 1, ...).
            second: this adapter's list.
        """
        if key == "added_cond_kwargs.image_embeds":
            return [*first, *second]
        return super().combine_unet_kwarg(key, first, second)

    # ---- inference hooks ---------------------------------------------------------
    def pipeline_components(self) -> dict[str, Any]:
        """The image encoder and processor the pipeline encodes ``ip_adapter_image`` with."""
        return {"image_encoder": self.image_encoder, "feature_extractor": self.feature_extractor}

    @classmethod
    def combine_pipeline_kwargs(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several IP-Adapters' images (or embeddings) side by side in one list, as diffusers takes them."""
        combined: dict[str, Any] = {}
        for part in parts:
            for key, value in part.items():
                if key in ("ip_adapter_image", "ip_adapter_image_embeds"):
                    combined.setdefault(key, []).extend(value if isinstance(value, list) else [value])
                else:
                    combined[key] = value
        return combined

    def pipeline_call_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``ip_adapter_image`` (or precomputed ``ip_adapter_image_embeds``) for the pipeline.

        Args:
            inputs: ``ip_images``: reference images (PIL images or paths). condkit attaches
                one IP-Adapter per base, so all of them are this adapter's references;
                several give their image tokens side by side (diffusers concatenates
                them). Or ``ip_adapter_image_embeds``: a list as diffusers takes it.

        Raises:
            UserError: no reference image was given.
        """
        if inputs.get("ip_adapter_image_embeds") is not None:
            return {"ip_adapter_image_embeds": inputs["ip_adapter_image_embeds"]}
        references = [_open_image(item) for item in inputs.get("ip_images") or []]
        if not references:
            raise UserError(f"IP-Adapter {self.name!r}: needs a reference image (--ip-image PATH)")
        # One entry per IP-Adapter; a list inside it = several images for that adapter.
        return {"ip_adapter_image": [references[0] if len(references) == 1 else references]}

    def validate(self, base, validation_config, step: int):
        """Sample fixed reference images and measure how much of them the output keeps.

        References: ``validation.images``, else held-out shapes-world references. Prompt:
        the first ``validation.prompts`` entry, else ``a shape``.

        Returns:
            Rows ``[reference, sample]`` and ``ip_adapter/encoder_similarity`` (cosine in
            the image encoder's space) and ``ip_adapter/colour_similarity`` (colour
            histogram intersection), both means over the references.
        """
        from condkit.adapters.ip_adapter.metrics import sample_with_references, similarity_report

        references = [_open_image(p) for p in getattr(validation_config, "images", [])] or default_validation_references()
        prompts = getattr(validation_config, "prompts", []) or ["a shape"]
        samples = sample_with_references(
            self,
            base,
            references,
            prompt=prompts[0],
            num_inference_steps=validation_config.num_inference_steps,
            guidance_scale=validation_config.guidance_scale,
            seed=getattr(validation_config, "seed", 0),
        )
        metrics = similarity_report(references, samples, self.image_encoder, self.feature_extractor)
        return [[ref, out] for ref, out in zip(references, samples)], {f"ip_adapter/{k}": v for k, v in metrics.items()}

    # ---- persistence -------------------------------------------------------------
    def state_dict_flat(self) -> dict[str, torch.Tensor]:
        """The flat ``image_proj.*``/``ip_adapter.*`` weights diffusers' loader reads."""
        names = list(self.processors)  # insertion order = attn_processors order
        return formats.to_flat_state_dict(self.image_projection, [self.processors[n] for n in names])

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``ip_adapter.safetensors``, ``image_encoder/`` and ``condkit_adapter.json``.

        ``pipe.load_ip_adapter(out_dir, subfolder="", weight_name="ip_adapter.safetensors",
        image_encoder_folder="image_encoder")`` then loads it in plain diffusers.
        """
        out_dir = Path(out_dir)
        weights = out_dir / formats.WEIGHT_NAME
        save_safetensors_atomic(self.state_dict_flat(), weights, metadata={"format": "pt", "condkit_kind": self.kind})
        encoder = formats.save_image_encoder(self.image_encoder, self.feature_extractor, out_dir / formats.IMAGE_ENCODER_FOLDER)
        description = self.save_description(out_dir)
        return [weights, encoder, description]

    @classmethod
    def load(cls, path: str | Path, base, name: str = "default") -> IPAdapter:
        """Load a condkit folder, a flat ``.safetensors`` or an original ``.bin`` and attach it.

        The variant and token count come from the file; scales and dropout from the
        folder's ``condkit_adapter.json`` when there is one. An ``image_encoder/`` folder
        beside the weights is used instead of the base's encoder.
        """
        path = Path(path)
        weights = formats.resolve_weight_file(path)
        state = formats.read_state_dicts(weights)
        variant = formats.detect_variant(state["image_proj"], weights)
        options = _saved_options(weights.parent / ADAPTER_CONFIG_FILE)
        tokens = state["image_proj"]["latents"].shape[1] if variant == "plus" else 0
        encoder_folder = weights.parent / formats.IMAGE_ENCODER_FOLDER
        options.update(variant=variant, num_tokens=tokens)
        if (encoder_folder / "config.json").is_file():  # the export's own encoder beats a saved path
            options["image_encoder"] = str(encoder_folder)
        adapter = cls(IPAdapterConfig(**options), name=name)
        adapter.image_projection, adapter.processors = formats.build_modules(base.unet, state, weights)
        adapter.attach(base)
        return adapter

    @classmethod
    def can_load(cls, path: str | Path) -> bool:
        """True for a file (or folder with one) holding ``image_proj``/``ip_adapter`` weights."""
        return formats.looks_like_ip_adapter(path)

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Variant, tokens, layers and dimensions of an IP-Adapter file."""
        weights = formats.resolve_weight_file(path)
        state = formats.read_state_dicts(weights)
        formats.check_image_encoder(weights)
        proj = state["image_proj"]
        variant = formats.detect_variant(proj, weights)
        layers = sorted({int(k.split(".")[0]) for k in state["ip_adapter"] if k.endswith("to_k_ip.weight")})
        first = state["ip_adapter"][f"{layers[0]}.to_k_ip.weight"]
        if variant == "base":
            tokens, embed_dim = 4, proj["proj.weight"].shape[1]
        else:
            tokens, embed_dim = proj["latents"].shape[1], proj["proj_in.weight"].shape[1]
        return {
            "kind": cls.kind,
            "format": "original pickle" if weights.suffix != ".safetensors" else "diffusers flat safetensors",
            "variant": variant,
            "num_tokens": int(tokens),
            "image_embed_dim": int(embed_dim),
            "cross_attention_dim": int(first.shape[1]),
            "cross_attention_layers": len(layers),
            "has_image_encoder": (weights.parent / formats.IMAGE_ENCODER_FOLDER / "config.json").is_file(),
        }


def default_validation_references(count: int = 8, size: int = 64) -> list:
    """Reference images of held-out shapes-world combos (never in training data)."""
    from PIL import Image

    from condkit.train.shapes_world import HELD_OUT_COMBOS, ShapesWorld

    world = ShapesWorld(seed=12345, size=size, include_held_out=True)
    rng = np.random.default_rng(12345)
    return [Image.fromarray(world.draw(*combo, rng).reference) for combo in HELD_OUT_COMBOS[:count]]


def _base_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The plain Linear under a peft LoRA wrapper (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _default_image_processor(image_encoder):
    """The processor diffusers' ``load_ip_adapter`` creates when a pipeline has none."""
    from transformers import CLIPImageProcessor

    size = image_encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)


def _open_image(item):
    """A reference as a PIL RGB image (paths and arrays through the data loader's ``load_rgb``)."""
    from PIL import Image

    from condkit.train.data import load_rgb

    return Image.fromarray(load_rgb(item)).convert("RGB")


def _saved_options(description: Path) -> dict[str, Any]:
    """The config saved in ``condkit_adapter.json`` as keyword arguments (empty when absent)."""
    config = IPAdapter.saved_config(description)
    return config.to_dict() if config is not None else {}
