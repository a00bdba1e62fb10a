"""A true diffusion prior (DALL·E 2, "unCLIP"): text → CLIP image embedding, by diffusion.

The network is diffusers' `PriorTransformer` (what Karlo and Kandinsky ship); this module is the process around it,
after DALLE2-pytorch's `DiffusionPrior`: `loss` (= `forward`) trains it, `sample` draws embeddings from it.

    prompt ─► CLIP text encoder ─► text_embeds (B, P) = text_projection(pooler_output)      ┐
                                   hidden_states (B, 77, D) = last_hidden_state, mask (B, 77) ├─► PriorTransformer
                          noisy image embedding x_t (B, P), timestep t                       ┘        │
                                                                      x̂₀: the clean image embedding (B, P)

It works in x₀-prediction (the network outputs the clean embedding, as in DALL·E 2 and DALLE2-pytorch) on the
cosine schedule ("squaredcos_cap_v2", 1000 steps); classifier-free guidance is learned by swapping the caption's
condition for the empty prompt's with probability `cond_drop_prob`.

On disk, inside a model folder (safetensors only):

    diffusion_prior/config.json, diffusion_pytorch_model.safetensors   the PriorTransformer (diffusers loads it)
    diffusion_prior/scheduler_config.json                              the sampling scheduler
    diffusion_prior/text_projection.safetensors                        {"weight": (P, D)}: CLIP's text projection

A folder without `diffusion_prior/` has no diffusion prior: `DiffusionPrior.from_pretrained` returns None.
The residual-MLP `minidalle.prior.Prior` is unrelated and stays the pipeline's default.
"""

from __future__ import annotations

import minidalle._quiet  # noqa: F401  (first: quiets diffusers' first import)
import inspect
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, PriorTransformer, SchedulerMixin, UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from torch import nn

from minidalle.errors import InvalidInput

SUBFOLDER = "diffusion_prior"
PROJECTION_FILE = "text_projection.safetensors"
_SCHEDULERS = {"DDIMScheduler": DDIMScheduler, "UnCLIPScheduler": UnCLIPScheduler}  # what `sample` can drive

Generators = torch.Generator | list[torch.Generator] | None


def default_scheduler() -> DDIMScheduler:
    """DDIM (η = 0) on the prior's training schedule, predicting x₀.

    Why DDIM and not Karlo's UnCLIPScheduler: UnCLIP is ancestral (DDPM) sampling; with ~10 steps each step
    re-injects noise that the remaining steps cannot remove. On the tiny-shapes prior's held-out captions (guidance
    4) DDIM puts 100 % of samples nearest their own caption's image centroid at 10 and 25 steps; UnCLIP 96 % / 86 %.
    "trailing" spacing starts at t = 999, pure noise under the cosine schedule ("leading" would start at t = 900,
    where the training data still shows through); the last step then lands at t = -1 (ᾱ = 1), i.e. returns x̂₀.
    """
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                         timestep_spacing="trailing", set_alpha_to_one=True,
                         # embeddings are standardised per dimension: |x₀| > 10 σ is never data (Karlo's prior
                         # clips at the same range); 1.0, DDIM's default, would clip real embeddings
                         clip_sample=True, clip_sample_range=10.0)


@dataclass
class PriorCondition:
    """What the prior is conditioned on, for a batch of prompts."""

    text_embeds: torch.Tensor  # (B, P): text_projection(pooler_output), the PriorTransformer's `proj_embedding`
    hidden_states: torch.Tensor  # (B, T, D): last_hidden_state, the PriorTransformer's `encoder_hidden_states`
    mask: torch.Tensor  # (B, T) bool: True on real tokens (BOS … EOS), False on padding

    def __len__(self) -> int:
        return self.text_embeds.shape[0]

    def __getitem__(self, index) -> PriorCondition:
        """Rows by int tensor / slice / list: `cond[caption_index]`."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return PriorCondition(self.text_embeds[index], self.hidden_states[index], self.mask[index])

    def expand(self, batch_size: int) -> PriorCondition:
        """A one-row condition (the empty prompt's) repeated to `batch_size` rows."""
        if len(self) == batch_size:
            return self
        if len(self) != 1:
            raise InvalidInput("uncond", f"must have 1 or {batch_size} rows, got {len(self)}")
        return PriorCondition(self.text_embeds.expand(batch_size, -1), self.hidden_states.expand(batch_size, -1, -1),
                              self.mask.expand(batch_size, -1))

    def to(self, device=None, dtype=None) -> PriorCondition:
        return PriorCondition(self.text_embeds.to(device=device, dtype=dtype),
                              self.hidden_states.to(device=device, dtype=dtype), self.mask.to(device=device))

    @staticmethod
    def cat(conds: list[PriorCondition]) -> PriorCondition:
        return PriorCondition(torch.cat([c.text_embeds for c in conds]), torch.cat([c.hidden_states for c in conds]),
                              torch.cat([c.mask for c in conds]))

    @staticmethod
    def where(pick: torch.Tensor, a: PriorCondition, b: PriorCondition) -> PriorCondition:
        """Row i from `a` where pick[i], else from `b` (the condition dropout of classifier-free guidance)."""
        return PriorCondition(torch.where(pick[:, None], a.text_embeds, b.text_embeds),
                              torch.where(pick[:, None, None], a.hidden_states, b.hidden_states),
                              torch.where(pick[:, None], a.mask, b.mask))


class DiffusionPrior(nn.Module):
    """Trains (`loss`, also `forward`) and samples (`sample`) a `PriorTransformer` predicting x₀.

    Embeddings are standardised per dimension with the net's own `clip_mean` / `clip_std` (set from the training
    data by `set_embedding_stats`), as Karlo and Kandinsky do, rather than L2-normalised and scaled like
    DALLE2-pytorch: the image embeddings this prior feeds (an IP-Adapter head) are CLIP's raw `image_embeds`, norm
    included, and standardising is exactly invertible (`post_process_latents`), whereas L2-normalising throws the
    norm away. It also removes the large component every CLIP embedding shares, so the unit-scale targets the
    network sees are the part that differs between captions; and the statistics travel inside the net's weights.
    """

    def __init__(self, net: PriorTransformer, scheduler: SchedulerMixin, text_projection: nn.Linear, *,
                 cond_drop_prob: float = 0.1):
        super().__init__()
        self.net, self.scheduler, self.text_projection = net, scheduler, text_projection
        self.cond_drop_prob = cond_drop_prob  # DALLE2-pytorch's cond_drop_prob: 10 % of captions become ""
        self._check_components()
        self.text_projection.requires_grad_(False)  # CLIP's projection: frozen, like the text encoder
        self._freeze_stats()

    # -- construction and files ---------------------------------------------------------------------------------
    def _check_components(self) -> None:
        cfg, proj = self.net.config, self.text_projection
        p = cfg.embedding_dim
        if (cfg.embedding_proj_dim or p) != p or (cfg.clip_embed_dim or p) != p:
            raise InvalidInput("diffusion_prior", f"embedding_proj_dim ({cfg.embedding_proj_dim}) and clip_embed_dim "
                               f"({cfg.clip_embed_dim}) must be None or embedding_dim ({p})")
        if proj.out_features != p:
            raise InvalidInput("text_projection", f"projects to {proj.out_features}, but the diffusion prior's "
                               f"embedding_dim (the CLIP image embedding size P) is {p}")
        if proj.in_features != p:
            raise InvalidInput("text_projection", f"takes the text width {proj.in_features}, but the PriorTransformer "
                               f"reads text hidden states of width embedding_dim = {p}; it needs D == P")
        if type(self.scheduler).__name__ not in _SCHEDULERS or self.scheduler.config.prediction_type != "sample":
            raise InvalidInput("scheduler", f"must be one of {sorted(_SCHEDULERS)} with prediction_type='sample', "
                               f"got {type(self.scheduler).__name__} ({self.scheduler.config.prediction_type!r})")

    def _freeze_stats(self) -> None:
        # clip_mean / clip_std are nn.Parameters in diffusers: keep them out of gradients and optimisers
        self.net.clip_mean.requires_grad_(False)
        self.net.clip_std.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model: str | Path, *, torch_dtype: torch.dtype | None = None) -> DiffusionPrior | None:
        """Load `{model}/diffusion_prior/` (a folder or a hub id); None when the model has no diffusion prior."""
        model = str(model)
        if Path(model).is_dir():
            if not (Path(model) / SUBFOLDER / "config.json").is_file():
                return None
            return cls._load(model, torch_dtype, lambda: Path(model) / SUBFOLDER / PROJECTION_FILE)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return cls._load(model, torch_dtype, lambda: hf_hub_download(model, f"{SUBFOLDER}/{PROJECTION_FILE}"))
        except (EntryNotFoundError, OSError) as e:
            if isinstance(e, EntryNotFoundError) or "does not appear to have" in str(e) or "no file named" in str(e):
                return None  # a hub repo without diffusion_prior/
            raise

    @classmethod
    def _load(cls, model: str, torch_dtype, projection_path) -> DiffusionPrior:
        net = PriorTransformer.from_pretrained(model, subfolder=SUBFOLDER, torch_dtype=torch_dtype,
                                               use_safetensors=True)
        config = DDIMScheduler.load_config(model, subfolder=SUBFOLDER)  # any scheduler class reads the file
        name = config.get("_class_name")
        if name not in _SCHEDULERS:
            raise InvalidInput("model", f"{model}: {SUBFOLDER}/scheduler_config.json names {name!r}, "
                               f"expected one of {sorted(_SCHEDULERS)}")
        scheduler = getattr(diffusers, name).from_config(config)
        weight = load_file(str(projection_path()))["weight"]  # (P, D)
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            projection.weight.copy_(weight)
        return cls(net, scheduler, projection.to(dtype=net.dtype))

    def save_pretrained(self, model_dir: str | Path) -> Path:
        """Write `{model_dir}/diffusion_prior/` (the net, its scheduler, the text projection); returns that folder."""
        out = Path(model_dir) / SUBFOLDER
        self.net.save_pretrained(out, safe_serialization=True)
        self.scheduler.save_pretrained(out)
        weight = self.text_projection.weight.detach().to("cpu").contiguous()
        save_file({"weight": weight}, str(out / PROJECTION_FILE))
        return out

    # -- module plumbing ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    @property
    def embedding_dim(self) -> int:
        return self.net.config.embedding_dim

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What training updates: the net, less its embedding statistics (the text projection is CLIP's)."""
        frozen = {id(self.net.clip_mean), id(self.net.clip_std)}
        return [p for p in self.net.parameters() if id(p) not in frozen]

    def requires_grad_(self, requires_grad: bool = True) -> DiffusionPrior:
        for p in self.trainable_parameters():
            p.requires_grad_(requires_grad)
        return self

    @torch.no_grad()
    def set_embedding_stats(self, image_embeds: torch.Tensor, *, min_std: float = 1e-4) -> None:
        """Standardise with the training data's per-dimension mean and std (image_embeds: (N, P), N ≥ 2)."""
        self._check_embeds(image_embeds, "image_embeds")
        x = image_embeds.to(device=self.device, dtype=torch.float32)
        self.net.clip_mean.copy_(x.mean(0, keepdim=True))  # (1, P)
        self.net.clip_std.copy_(x.std(0, keepdim=True).clamp_min(min_std))  # a constant dimension must not blow up

    def normalize(self, image_embeds: torch.Tensor) -> torch.Tensor:  # raw CLIP (B, P) -> unit scale (B, P)
        return (image_embeds - self.net.clip_mean) / self.net.clip_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:  # unit scale (B, P) -> raw CLIP (B, P)
        return self.net.post_process_latents(x)

    # -- conditions -------------------------------------------------------------------------------------------------
    def condition(self, text_encoder_output, attention_mask: torch.Tensor) -> PriorCondition:
        """The prior's condition from a CLIPTextModel output and the tokenizer's attention mask (B, T).

        The PriorTransformer reads exactly `num_embeddings` tokens (77 for a CLIP-sized prior): shorter outputs
        are padded with masked positions, longer ones keep their first `num_embeddings` tokens (for the tiny prior,
        16: past that the shapes captions are all padding). The pooled text embedding covers the whole prompt.
        """
        hidden, pooled = text_encoder_output.last_hidden_state, text_encoder_output.pooler_output  # (B,T,D), (B,D)
        cfg = self.net.config
        if hidden.shape[-1] != cfg.embedding_dim or pooled.shape[-1] != self.text_projection.in_features:
            raise InvalidInput("text_encoder", f"hidden size {hidden.shape[-1]} does not match the diffusion prior: "
                               f"its embedding_dim and text projection take {cfg.embedding_dim}")
        if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise InvalidInput("attention_mask", f"shape {tuple(attention_mask.shape)} does not match the text "
                               f"encoder's {tuple(hidden.shape[:2])}")
        hidden, mask = _fit_tokens(hidden, attention_mask.bool(), cfg.num_embeddings)  # (B, N, D), (B, N)
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        text_embeds = self.text_projection(pooled.to(device=self.device, dtype=self.dtype))  # (B, P)
        return PriorCondition(text_embeds, hidden, mask.to(self.device))

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], *, text_encoder, tokenizer) -> PriorCondition:
        """Tokenize (padded to the tokenizer's max length) and encode `prompts`, as Karlo and SD 1.5 do.

        The text encoder runs without the attention mask, as in Stable Diffusion and Karlo (CLIP is causal: real
        tokens never see the padding); the mask goes to the prior, which then ignores the padded positions.
        """
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")  # (B, 77)
        out = text_encoder(tokens.input_ids.to(text_encoder.device))
        return self.condition(out, tokens.attention_mask)

    # -- training ---------------------------------------------------------------------------------------------------
    def _check_embeds(self, image_embeds: torch.Tensor, field: str) -> None:
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.embedding_dim:
            raise InvalidInput(field, f"must be (N, {self.embedding_dim}) CLIP image embeddings, "
                               f"got {tuple(image_embeds.shape)}")

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: PriorCondition) -> torch.Tensor:  # -> x̂₀ (B, P)
        return self.net(x_t, t, proj_embedding=cond.text_embeds, encoder_hidden_states=cond.hidden_states,
                        attention_mask=cond.mask).predicted_image_embedding

    def loss(self, image_embeds: torch.Tensor, cond: PriorCondition, uncond: PriorCondition, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between x̂₀ and the (standardised) clean embedding, at a uniformly drawn timestep."""
        self._check_embeds(image_embeds, "image_embeds")
        b = image_embeds.shape[0]
        if len(cond) != b:
            raise InvalidInput("cond", f"has {len(cond)} rows for {b} image embeddings")
        x0 = self.normalize(image_embeds.to(device=self.device, dtype=self.dtype))  # (B, P)
        # random draws on the CPU (generator's device), then moved: the same seed trains the same on any device
        drop = torch.rand(b, generator=generator) < self.cond_drop_prob  # (B,)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator)  # (B,)
        noise = torch.randn(x0.shape, generator=generator).to(device=self.device, dtype=self.dtype)  # (B, P)
        alpha_bar = self.scheduler.alphas_cumprod[t].to(device=self.device, dtype=self.dtype)[:, None]  # (B, 1)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        cond = PriorCondition.where(drop.to(self.device), uncond.expand(b), cond)
        return F.mse_loss(self._predict(x_t, t.to(self.device), cond), x0)

    forward = loss

    # -- sampling ---------------------------------------------------------------------------------------------------
    def _check_sample_inputs(self, cond, uncond, num_inference_steps, guidance_scale, generator) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InvalidInput("num_inference_steps", f"must be a positive int, got {num_inference_steps!r}")
        if guidance_scale < 1.0:
            raise InvalidInput("guidance_scale", f"must be >= 1, got {guidance_scale!r}")
        if guidance_scale > 1.0 and uncond is None:
            raise InvalidInput("uncond", f"guidance_scale {guidance_scale} needs the empty prompt's condition")
        if isinstance(generator, list) and len(generator) != len(cond):
            raise InvalidInput("generator", f"{len(generator)} generators for {len(cond)} prompts")

    @torch.no_grad()
    def sample(self, cond: PriorCondition, uncond: PriorCondition | None = None, *, num_inference_steps: int = 10,
               guidance_scale: float = 4.0, generator: Generators = None) -> torch.Tensor:
        """CLIP image embeddings (B, P) for the conditions, with classifier-free guidance on x̂₀.

        Pass one CPU generator per row (a list) to make each row reproducible on its own, whatever the batch.
        guidance_scale 1 runs the conditional branch only (`uncond` is then unused).
        """
        # 1. check inputs
        self._check_sample_inputs(cond, uncond, num_inference_steps, guidance_scale, generator)
        b, cfg_on = len(cond), guidance_scale > 1.0
        # 2. timesteps, on a private copy so concurrent samplers never share the scheduler's state
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps.tolist()
        # 3. initial noise, drawn on the CPU row by row when given a list of generators
        x = randn_tensor((b, self.embedding_dim), generator=generator, device=torch.device("cpu"),
                         dtype=torch.float32).to(device=self.device, dtype=self.dtype) * scheduler.init_noise_sigma
        both = PriorCondition.cat([uncond.expand(b), cond]) if cfg_on else cond  # (2B | B, …): one net call a step
        # 4. denoise
        for i, t in enumerate(timesteps):
            x0 = self._predict(torch.cat([x, x]) if cfg_on else x, torch.tensor(t, device=self.device), both)
            if cfg_on:
                x0_uncond, x0_cond = x0.chunk(2)
                x0 = x0_uncond + guidance_scale * (x0_cond - x0_uncond)
            x = _step(scheduler, x0, t, x, prev=timesteps[i + 1] if i + 1 < len(timesteps) else -1,
                      generator=generator)
        # 5. back to CLIP's scale
        return self.denormalize(x)


def _fit_tokens(hidden: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D), (B, T) -> (B, n, D), (B, n): cut, or pad with masked zero tokens."""
    if hidden.shape[1] >= n:
        return hidden[:, :n], mask[:, :n]
    pad = n - hidden.shape[1]
    return F.pad(hidden, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)


def _step(scheduler: SchedulerMixin, x0: torch.Tensor, t: int, x: torch.Tensor, *, prev: int,
          generator: Generators) -> torch.Tensor:
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if isinstance(scheduler, UnCLIPScheduler):
        kwargs["prev_timestep"] = prev if prev >= 0 else None  # Karlo's loop: explicit strides, t-1 at the end
    return scheduler.step(x0, t, x, **kwargs).prev_sample


def new_tiny(embedding_dim: int, *, num_embeddings: int = 16, num_layers: int = 4, heads: int = 4, head_dim: int = 16,
             text_projection: torch.Tensor | None = None, scheduler: SchedulerMixin | None = None,
             cond_drop_prob: float = 0.1) -> DiffusionPrior:
    """A small, untrained diffusion prior for CLIP embeddings of width `embedding_dim` (text width must equal it).

    `text_projection` is CLIP's (P, D) weight; None makes a fresh random one (tests, development).
    """
    net = PriorTransformer(
        num_attention_heads=heads, attention_head_dim=head_dim,  # inner width heads·head_dim = 64 = P for tiny CLIP
        num_layers=num_layers,  # 4 blocks: the caption → embedding map of tiny-shapes is simple; Karlo uses 20
        embedding_dim=embedding_dim,
        # text tokens read: the shapes captions take at most 11 of CLIP's 77 (the rest is padding the mask hides);
        # attending over 16 + 4 positions instead of 77 + 4 makes a training step ~4x cheaper
        num_embeddings=num_embeddings,
        additional_embeddings=4,  # text embedding, timestep, noisy embedding, and the "prd" query read out
        norm_in_type="layer",  # pre-norm the token sequence: text tokens and unit-scale embeddings differ in scale
        embedding_proj_norm_type="layer",  # CLIP's projected text embedding has an arbitrary norm; this fixes it
        added_emb_type="prd",  # the learned query token whose output is x̂₀ (DALL·E 2's final-token readout)
    )
    with torch.no_grad():
        net.clip_std.fill_(1.0)  # diffusers starts it at 0, which would map every sample to the mean
    projection = nn.Linear(embedding_dim, embedding_dim, bias=False)
    if text_projection is not None:
        if text_projection.ndim != 2:
            raise InvalidInput("text_projection", f"must be a (P, D) weight, got {tuple(text_projection.shape)}")
        projection = nn.Linear(text_projection.shape[1], text_projection.shape[0], bias=False)
        with torch.no_grad():
            projection.weight.copy_(text_projection)
    return DiffusionPrior(net, scheduler or default_scheduler(), projection, cond_drop_prob=cond_drop_prob)
