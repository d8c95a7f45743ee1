"""What a generation is, for every sampler: how to decode (:class:`DecodeSpec`), what a run records
(:class:`Trajectory`, saved without pickle, and its file checks), and the pieces every sampler shares
(:func:`transfer_schedule`, :func:`gumbel_argmax`, :func:`take_pass`, :func:`prompt_token_ids`).

The samplers themselves sit above this module: :mod:`sap_core.diffusion` (LLaDA semantics and causal
decoding, and :func:`~sap_core.diffusion.generate`, which picks the family's sampler),
:mod:`sap_core.dream_sampler` (Dream's ``diffusion_generate``) and :mod:`sap_core.mmada_sampler` (MMaDA's).
"""

from __future__ import annotations

import json
import math
import numbers
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sap_core.attention import AttentionRecorder
from sap_core.errors import DecodeSpecError, SapError
from sap_core.files import atomic_write, is_special
from sap_core.memory import free_memory
from sap_core.models import ModelHandle

REMASKING = ("low_confidence", "random", "entropy")
MMADA_REMASKING = ("low_confidence", "random")  # MMaDA's sampler has no entropy order
SAMPLERS = ("llada", "dream", "mmada")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
# model family (``ModelHandle.family``) -> the sampler its authors decode with; every other family: "llada"
DEFAULT_SAMPLER = {"Dream": "dream", "mmada": "mmada"}


@dataclass(frozen=True)
class DecodingControls:
    """The decoding settings a model's controls offer (the app draws them; this decides which):

    * ``sampler``: the sampler that runs (``"causal"`` for a causal model); ``samplers``: those a user may
      choose between for this family (empty: no choice; a Dream model: Dream's own first, then LLaDA's).
    * ``fields``: the :class:`DecodeSpec` fields shown besides ``gen_length``, in order; every other field
      keeps its default. ``remasking``: the remasking orders offered when ``"remasking"`` is shown.
    * ``note``: one line about the sampler for the reader ("" when there is nothing to say).
    """

    sampler: str
    samplers: tuple[str, ...]
    fields: tuple[str, ...]
    remasking: tuple[str, ...]
    note: str


LLADA_FIELDS = ("steps", "block_length", "remasking", "temperature", "cfg_scale", "seed")
DREAM_FIELDS = ("steps", "temperature", "alg", "alg_temp", "eps", "top_p", "top_k", "seed")


def decoding_controls(family: str | None, causal: bool, sampler: str | None = None) -> DecodingControls:
    """What the decoding controls of a model of ``family`` offer with ``sampler`` chosen (None: the family's own,
    :data:`DEFAULT_SAMPLER`): Dream's options for Dream's sampler, LLaDA's (said not to be Dream's own) for the
    LLaDA sampler on a Dream model, LLaDA's plus ``text_only`` for MMaDA, LLaDA's for every other DLM, and
    temperature and seed for a causal model. :class:`DecodeSpecError` for a sampler the family does not offer."""
    if causal:
        note = "Causal model: one token per step, left to right; steps, blocks, remasking and guidance do not apply."
        return DecodingControls("causal", (), ("temperature", "seed"), (), note)
    own = DEFAULT_SAMPLER.get(family, "llada")
    samplers = ("dream", "llada") if own == "dream" else ()
    chosen = sampler or own
    if chosen not in (samplers or (own,)):
        offered = ", ".join(samplers or (own,))
        raise DecodeSpecError(f"A {family} model decodes with {offered}, not sampler '{chosen}'.")
    if chosen == "dream":
        note = "Dream's own diffusion_generate: steps may exceed or not divide the length; no blocks or guidance."
        return DecodingControls("dream", samplers, DREAM_FIELDS, (), note)
    if chosen == "mmada":
        note = "MMaDA's own text sampler: it picks over the whole vocabulary (image tokens too) unless text only."
        return DecodingControls("mmada", samplers, (*LLADA_FIELDS, "text_only"), MMADA_REMASKING, note)
    note = "LLaDA's sampler (blocks, an even split per step): not Dream's own decoding." if samplers else ""
    return DecodingControls("llada", samplers, LLADA_FIELDS, REMASKING, note)


def decoding_words(spec: DecodeSpec, causal: bool = False) -> str:
    """The decoding part of a run's settings, for people: ``64 steps, block 16, low_confidence, CFG 0`` (the
    LLaDA sampler), ``64 steps, Dream's sampler, alg entropy (alg_temp 0), eps 0.001, top_p 1, top_k 0``,
    ``…, MMaDA's sampler, text tokens only``; a causal model: ``causal, one token per step``."""
    if causal:
        return "causal, one token per step"
    if spec.sampler == "dream":
        return (
            f"{spec.steps} steps, Dream's sampler, alg {spec.alg} (alg_temp {spec.alg_temp:g}), eps {spec.eps:g}, "
            f"top_p {spec.top_p:g}, top_k {spec.top_k}"
        )
    words = f"{spec.steps} steps, block {spec.block_length}, {spec.remasking}, CFG {spec.cfg_scale:g}"
    if spec.sampler == "mmada":
        words += ", MMaDA's sampler" + (", text tokens only" if spec.text_only else "")
    return words


@dataclass(frozen=True)
class DecodeSpec:
    gen_length: int = 64
    steps: int = 64
    block_length: int = 16
    remasking: str = "low_confidence"
    temperature: float = 0.0
    cfg_scale: float = 0.0
    seed: int = 0
    # Dream's sampler (sampler="dream"); None: the model family's own (DEFAULT_SAMPLER)
    sampler: str | None = None
    alg: str = "entropy"
    alg_temp: float = 0.0
    eps: float = 1e-3
    top_p: float = 1.0
    top_k: int = 0
    # MMaDA only: pick among its text rows, never an image-codebook row (sap_core.mmada_sampler).
    text_only: bool = False

    def __post_init__(self) -> None:
        """Model-free checks (types, finiteness, ranges) at construction; :meth:`validate` adds the model's."""
        for name in ("gen_length", "steps", "block_length", "seed", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise DecodeSpecError(f"{name} must be a whole number (got {value!r}).")
            object.__setattr__(self, name, int(value))
        if not 0 <= self.seed < 2**63:
            raise DecodeSpecError(f"seed must be in [0, 2**63) (got {self.seed}).")
        for name, hint in FLOAT_HINTS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise DecodeSpecError(f"{name} must be a number (got {value!r}).")
            if not math.isfinite(value):
                raise DecodeSpecError(f"{name} must be a finite number (got {value}); {hint}.")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.remasking, str):
            raise DecodeSpecError(f"remasking must be one of {', '.join(REMASKING)} (got {self.remasking!r}).")
        if not isinstance(self.text_only, bool):
            raise DecodeSpecError(f"text_only must be true or false (got {self.text_only!r}).")
        self._check_dream_options()

    def _check_dream_options(self) -> None:
        """The sampler's name and Dream's options (model-free: they do not depend on the model)."""
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise DecodeSpecError(
                f"sampler must be one of {', '.join(SAMPLERS)} (got {self.sampler!r}); leave it unset for the model family's own."
            )
        if self.alg not in DREAM_ALGS:
            raise DecodeSpecError(f"alg must be one of {', '.join(DREAM_ALGS)} (got {self.alg!r}).")
        if self.alg_temp < 0:
            raise DecodeSpecError(f"alg_temp must be >= 0 (got {self.alg_temp}); 0 unmasks the most confident positions.")
        if not 0 < self.eps < 1:
            raise DecodeSpecError(f"eps must be in (0, 1) (got {self.eps}); Dream's default is 0.001.")
        if not 0 < self.top_p <= 1:
            raise DecodeSpecError(f"top_p must be in (0, 1] (got {self.top_p}); 1 turns nucleus filtering off.")
        if self.top_k < 0:
            raise DecodeSpecError(f"top_k must be >= 0 (got {self.top_k}); 0 turns top-k filtering off.")

    def sampler_for(self, family: str | None) -> str:
        """The sampler that runs for a model of ``family``: :attr:`sampler`, else the family's own."""
        return self.sampler or DEFAULT_SAMPLER.get(family, "llada")

    @property
    def n_blocks(self) -> int:
        return self.gen_length // self.block_length

    def validate(
        self, causal: bool = False, prompt_length: int = 0, max_length: int | None = None, family: str | None = None
    ) -> None:
        """Raise :class:`DecodeSpecError` for impossible settings, before any work starts (``family``:
        the model's, which picks the sampler when :attr:`sampler` is None)."""
        if self.gen_length < 1:
            raise DecodeSpecError(f"gen_length must be at least 1 (got {self.gen_length}).")
        if max_length is not None and prompt_length + self.gen_length > max_length:
            raise DecodeSpecError(
                f"prompt ({prompt_length} tokens) + gen_length ({self.gen_length}) exceeds the model's "
                f"max_sequence_length {max_length}; shorten the prompt or gen_length."
            )
        if self.temperature < 0:
            raise DecodeSpecError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy.")
        if self.cfg_scale < 0:
            raise DecodeSpecError(f"cfg_scale must be >= 0 (got {self.cfg_scale}); 0 turns guidance off.")
        if self.remasking not in REMASKING:
            raise DecodeSpecError(f"remasking must be one of {', '.join(REMASKING)} (got '{self.remasking}').")
        if causal:
            if self.sampler == "dream":
                raise DecodeSpecError("Dream's sampler decodes a masked-diffusion model; a causal model decodes token by token.")
            self._validate_causal(prompt_length)
        elif self.sampler_for(family) == "dream":
            if self.steps < 1:
                raise DecodeSpecError(f"steps must be at least 1 (got {self.steps}).")
            if self.cfg_scale > 0:
                raise DecodeSpecError("Dream's sampler has no classifier-free guidance; set cfg_scale=0 or sampler='llada'.")
        else:
            self._validate_schedule()

    def _validate_causal(self, prompt_length: int) -> None:
        if self.cfg_scale > 0:
            raise DecodeSpecError("Classifier-free guidance needs a masked-diffusion model; set cfg_scale=0 for a causal model.")
        if prompt_length < 1:
            raise DecodeSpecError("A causal model needs at least one prompt token to continue from; give a prompt.")

    def _validate_schedule(self) -> None:
        """The masked-diffusion schedule: blocks and steps that divide evenly."""
        if self.block_length < 1 or self.steps < 1:
            raise DecodeSpecError("steps and block_length must be at least 1.")
        if self.gen_length % self.block_length:
            raise DecodeSpecError(
                f"gen_length ({self.gen_length}) must be divisible by block_length ({self.block_length}); "
                f"e.g. block_length={_divisor_hint(self.gen_length, self.block_length)}."
            )
        if self.steps > self.gen_length:
            raise DecodeSpecError(
                f"steps ({self.steps}) cannot exceed gen_length ({self.gen_length}): each step unmasks at least one token."
            )
        if self.steps % self.n_blocks:
            raise DecodeSpecError(
                f"steps ({self.steps}) must be divisible by the number of blocks "
                f"(gen_length/block_length = {self.n_blocks}); e.g. steps={max(self.n_blocks, self.steps // self.n_blocks * self.n_blocks)}."
            )


FLOAT_HINTS = {
    "temperature": "0 means greedy",
    "cfg_scale": "0 turns guidance off",
    "alg_temp": "0 unmasks the most confident positions",
    "eps": "Dream's default is 0.001",
    "top_p": "1 turns nucleus filtering off",
}


def _divisor_hint(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """How many tokens each of ``steps`` steps unmasks: as even as possible, earlier steps first."""
    base, extra = divmod(n_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


@dataclass
class Trajectory:
    """Everything one generation did, step by step (``S`` steps, ``L = prompt + gen`` positions).

    * ``tokens``: ``int64 [S, L]``, the model input at each step (AR: positions not yet fed hold ``filler_id``).
    * ``final_tokens``: ``int64 [L]``, the sequence after the last step.
    * ``decoded_at``: ``int64 [L]``, the step at which each position was decoded; -1 for the prompt (Dream's
      sampler also fills a ``[MASK]`` written in the prompt, as Dream's code does) and for a position still
      masked at the end (Dream's sampler can draw the mask token itself).
    * ``confidence``: ``float32 [S, L]``, softmax probability of each token decoded at that step; NaN elsewhere.
    * ``mass``: ``float32 [S, layers, heads, L]`` or None, the attention mass each key position
      receives (sum over queries of softmax probabilities); sums to ``valid_length[s]`` over keys.
    * ``valid_length``: ``int64 [S]``, positions fed to the model at each step (L for a DLM).
    * ``step_seconds``: ``float64 [S]``, wall time of each step.
    * ``spec``: the settings, with ``sampler`` set to the sampler that ran; ``note``: what a reader should
      know about it (the LLaDA sampler on a Dream model is not Dream's own; empty otherwise).
    """

    tokens: np.ndarray
    final_tokens: np.ndarray
    prompt_length: int
    decoded_at: np.ndarray
    confidence: np.ndarray
    mass: np.ndarray | None
    valid_length: np.ndarray
    step_seconds: np.ndarray
    causal: bool
    mask_id: int
    spec: DecodeSpec
    prompt: str = ""
    note: str = ""

    @property
    def n_steps(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def generated_ids(self) -> np.ndarray:
        return self.final_tokens[self.prompt_length :]

    def save(self, path) -> Path:
        """Write to ``.npz`` (arrays plus the spec) atomically and return the path written: ``path``, with
        ``.npz`` appended when it lacks it. :meth:`load` reads it back (and accepts either form)."""
        arrays = {k: getattr(self, k) for k in ARRAYS}
        if self.mass is not None:
            arrays["mass"] = self.mass
        meta = dict(
            prompt_length=self.prompt_length,
            causal=self.causal,
            mask_id=self.mask_id,
            spec=asdict(self.spec),
            prompt=self.prompt,
            note=self.note,
        )
        target = npz_path(path)
        atomic_write(target, lambda tmp: np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays), suffix=".npz")
        return target

    @classmethod
    def load(cls, path) -> Trajectory:
        """Read a trajectory written by :meth:`save` (``path`` with or without ``.npz``). Every array's
        declared shape is checked against the steps and length recorded in ``tokens`` before it is
        inflated, so a small hostile file cannot expand to gigabytes; a foreign or damaged file, or an
        attention record holding NaN or infinity, is refused with a :class:`TrajectoryError`."""
        path = Path(path)
        if not path.is_file() and npz_path(path).is_file():
            path = npz_path(path)
        if not path.is_file():
            raise TrajectoryError(f"No trajectory at '{path}'; write one with 'generate --trajectory'.")
        try:
            with np.load(path, allow_pickle=False) as data:
                members = _declared_shapes(data.zip)
                shapes = {name: shape for name, (shape, _) in members.items()}
                expected = _expected_shapes(shapes, path)
                for name, shape in shapes.items():
                    if name != "mass" and name in expected and shape != expected[name]:
                        raise TrajectoryError(f"'{path}': {name} has shape {list(shape)}, expected {list(expected[name])}.")
                if "mass" in shapes:
                    S, L = expected["tokens"]
                    mass = shapes["mass"]
                    if len(mass) != 4 or mass[0] != S or mass[3] != L:
                        raise TrajectoryError(f"'{path}': mass has shape {list(mass)}, expected [{S}, layers, heads, {L}].")
                _check_inflation(data.zip, members, path)
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in ARRAYS + ("mass",) if k in data.files}
            spec = meta.pop("spec")
            if isinstance(spec, dict):
                spec.setdefault("sampler", "llada")  # written before Dream's sampler existed: the LLaDA one ran
            spec = DecodeSpec(**spec)
            traj = cls(mass=arrays.pop("mass", None), spec=spec, **arrays, **meta)
        except SapError:
            raise
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            zipfile.BadZipFile,
            json.JSONDecodeError,
            EOFError,
            RecursionError,
        ) as exc:
            raise TrajectoryError(
                f"'{path}' is not a trajectory .npz written by 'generate --trajectory' ({type(exc).__name__})."
            ) from None
        if traj.mass is not None and not np.isfinite(traj.mass).all():
            raise TrajectoryError(
                f"'{path}': the attention record holds NaN or infinite values; regenerate it with "
                "'generate --record-attention --trajectory'."
            )
        return traj


class TrajectoryError(SapError):
    """A trajectory file that cannot be read."""


ARRAYS = ("tokens", "final_tokens", "decoded_at", "confidence", "valid_length", "step_seconds")
MAX_STEPS_LENGTH = 2**26
# A recorded attention mass compresses a few times at most (float noise); a member declaring more than
# this many times its stored size is a decompression bomb, not a trajectory. Small members are exempt.
MAX_INFLATION = 50
INFLATION_EXEMPT = 64 * 2**20


def _check_inflation(archive: zipfile.ZipFile, members: dict, path: Path) -> None:
    """Refuse members whose declared size is far beyond their stored size, or beyond the free RAM."""
    total = 0
    for info in archive.infolist():
        name = info.filename[:-4]
        if name not in members:
            continue
        shape, itemsize = members[name]
        declared = math.prod(shape) * itemsize
        total += declared
        if declared > INFLATION_EXEMPT and declared > MAX_INFLATION * max(info.compress_size, 1):
            raise TrajectoryError(
                f"'{path}': '{name}' declares {declared / 2**20:,.0f} MiB stored in "
                f"{info.compress_size / 2**20:,.1f} MiB; it is not a trajectory SinkScope wrote."
            )
    ram = free_memory("cpu")[0]
    if total > 0.8 * ram:
        raise TrajectoryError(
            f"'{path}' needs about {total / 2**30:.1f} GiB to load and {ram / 2**30:.1f} GiB is free; "
            "load it on a machine with more memory."
        )


def npz_path(path) -> Path:
    """``path`` as :meth:`Trajectory.save` writes it: with the ``.npz`` suffix numpy adds (a device or FIFO,
    such as ``/dev/null``, is written as it is)."""
    path = Path(path)
    return path if path.suffix == ".npz" or is_special(path) else path.with_name(path.name + ".npz")


def _declared_shapes(archive: zipfile.ZipFile) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{array name: (shape, item size)}`` from each ``.npy`` member's header, without reading the data."""
    shapes = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        shapes[info.filename[:-4]] = (tuple(int(x) for x in shape), np.dtype(dtype).itemsize)
    return shapes


def _expected_shapes(shapes: dict, path: Path) -> dict[str, tuple[int, ...]]:
    if "tokens" not in shapes or len(shapes["tokens"]) != 2 or "meta" not in shapes:
        raise TrajectoryError(f"'{path}' is not a trajectory .npz written by 'generate --trajectory' (no tokens/meta).")
    S, L = shapes["tokens"]
    if S * L > MAX_STEPS_LENGTH or shapes["meta"] != ():
        raise TrajectoryError(f"'{path}': tokens of shape {[S, L]} is beyond any trajectory SinkScope writes.")
    return {
        "tokens": (S, L),
        "final_tokens": (L,),
        "decoded_at": (L,),
        "confidence": (S, L),
        "valid_length": (S,),
        "step_seconds": (S,),
    }


def gumbel_argmax(
    logits: torch.Tensor, temperature: float, generator: torch.Generator, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """``argmax(logits + T·Gumbel)`` in float64: a sample from ``softmax(logits / T)`` (greedy at T=0), for the
    rows ``rows`` of ``logits [N, V]`` only when given (``[n]`` indices). The noise is drawn for all ``N`` rows
    either way, so the generator's stream, and every sampled row, is that of the full draw."""
    if temperature == 0:
        return (logits if rows is None else logits[rows]).double().argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    if rows is not None:
        logits, u = logits[rows], u[rows]
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(-1)


def prompt_token_ids(handle: ModelHandle, prompt) -> list[int]:
    """Token ids of a prompt given as text (UTF-8 ``bytes`` accepted) or as ids, each checked to be in the
    vocabulary; else :class:`DecodeSpecError`."""
    if isinstance(prompt, (bytes, bytearray)):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeSpecError(f"The prompt is not UTF-8 text (byte {exc.start}: {exc.reason}); give UTF-8 text.") from None
    if isinstance(prompt, str):
        return handle.encode(prompt)
    try:
        ids = [i for i in prompt]
    except TypeError:
        raise DecodeSpecError(f"The prompt must be text or a list of token ids (got {type(prompt).__name__}).") from None
    vocab = handle.vocab_size
    bad = [
        i
        for i in ids
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or int(i) < 0 or (vocab is not None and int(i) >= vocab)
    ]
    if bad:
        raise DecodeSpecError(
            f"Prompt ids must be integers in [0, {vocab if vocab is not None else 'vocabulary size'}) "
            f"for this model's vocabulary (got {bad[0]!r})."
        )
    return [int(i) for i in ids]


def take_pass(recorder: AttentionRecorder) -> np.ndarray:
    """The mass of the pass just run, ``[layers, heads, L]`` (first batch row); the recorder keeps no copy."""
    return take_rows(recorder)[0]


def take_rows(recorder: AttentionRecorder) -> np.ndarray:
    """The mass of the pass just run for every batch row, ``float32 [B, layers, heads, L]``; the recorder keeps no copy."""
    out = recorder.end_pass().numpy()
    recorder.passes.clear()
    return out
