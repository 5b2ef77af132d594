"""``hf``: a local Hugging Face model folder, scored by what kind of model it is. Its weights are the baseline.

``fewbit study hf --path DIR`` (and every other verb) loads ``DIR`` with ``transformers``' ``from_pretrained``, in
float32, with the tokenizer saved beside it, strictly offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``):
a folder that is incomplete is an error naming what is missing, never a download. Nothing is trained: the runs
layer (:func:`fewbit.workloads.runs.baseline`) returns the pretrained model as the FP32 baseline.

The kind comes from ``config.json``'s ``architectures`` (the class ``save_pretrained`` wrote):

==================  ==========================  ===========================================================
kind                architectures               metric (``--text FILE``, else embedded data)
==================  ==========================  ===========================================================
``causal``          ``*ForCausalLM``,           perplexity (and bits per byte) of the text read in
                    ``*LMHeadModel``            non-overlapping windows of ``block_size`` tokens; FILE: any
                                                UTF-8 text, split 80/10/10 at line ends; embedded: the lm
                                                workload's standard-library corpus (``max_bytes`` of it)
``masked``          ``*ForMaskedLM``            agreement of mean-pooled last hidden states with the FP32
                                                model, cosine in percent (mean, and the worst sentence), and
                                                the masked-LM loss on 15% of the tokens (fixed per sentence)
``encoder``         ``*Model`` (no head)        the same agreement, without the masked-LM loss
``classifier``      ``*ForSequenceClassif...``  accuracy (%) on a labelled TSV (``label<TAB>text`` lines, the
                                                label an index or a name of ``config.label2id``); without
                                                labels, agreement (%) with the FP32 model's labels
==================  ==========================  ===========================================================

Sentences (masked, encoder, unlabelled classifier) are FILE's non-empty lines, or the embedded set: lines of the
standard-library corpus with 4 to 40 words. Bits per byte divide the summed NLL (in bits) by the UTF-8 bytes of
the predicted tokens, decoded.

Training (``fewbit train hf``, and the verbs that fine-tune, such as ``fewbit ptq --qat``) fine-tunes the
pretrained model on the training split: next-token loss (causal), masked-LM loss (masked), cross-entropy on the
labels (classifier with labels); an encoder without a head, or a classifier without labels, is distilled towards
the FP32 model (1 - cosine of the embeddings; KL divergence of the label distributions).

**Memory.** Before loading, the float32 size is estimated from the weight files and their stored dtype; three
times that (the FP32 model, a converted copy, and the FP32 reference the agreement metrics need) must fit in the
available memory (``/proc/meminfo``'s MemAvailable, or ``memory_gb``), else a clear error, before any loading.

``transformers`` is imported only here, on first use (``pip install transformers`` when it is missing).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewbit.workloads.base import (
    DataError,
    Model,
    Samples,
    Source,
    TrainSettings,
    Workload,
    collate,
    limited,
    model_device,
    unwrap,
)
from fewbit.workloads.data import text

KINDS = ("causal", "masked", "encoder", "classifier")
# (suffix of the architecture's class name, kind), the first match wins.
ARCHITECTURES = (("ForCausalLM", "causal"), ("LMHeadModel", "causal"), ("ForMaskedLM", "masked"),
                 ("ForSequenceClassification", "classifier"), ("Model", "encoder"))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint: model.safetensors.index.json lists its shards
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}
MEMORY_FACTOR = 3  # the FP32 model, one converted copy, the FP32 reference (see the module docstring)
MASK_PERCENT = 15
TRAIN_PERCENT, VALID_PERCENT = 80, 10  # of a text file: the rest is the test split
SENTENCE_WORDS = (4, 40)


def _transformers():
    """The ``transformers`` module, offline; ImportError naming the install when it is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ImportError("the hf workload needs Hugging Face transformers: pip install transformers") from None
    return transformers


@dataclass(frozen=True)
class HFConfig(TrainSettings):
    """``path``: the model folder (required by the workload; a config may leave it to ``--path``). ``text``: a
    data file (see the module docstring; empty: embedded data). ``block_size``: tokens per window or sentence,
    capped by the model's positions. ``max_bytes``: how much of the embedded corpus (over all splits).
    ``sentences``: at most this many per split. ``memory_gb``: the memory the model may use (0: what the machine
    has available now). The training settings fine-tune."""

    path: str = ""
    text: str = ""
    block_size: int = 128
    max_bytes: int = 600_000
    sentences: int = 256
    memory_gb: float = 0.0
    eval_batch_size: int = 8
    steps: int = 100
    batch_size: int = 8
    lr: float = 2e-5
    warmup: int = 10
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("block_size", "sentences", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_bytes < 0 or self.memory_gb < 0:
            raise ValueError(f"max_bytes={self.max_bytes}, memory_gb={self.memory_gb}: each must be >= 0 "
                             "(0: all of the corpus; the memory available)")


@dataclass(frozen=True)
class Folder:
    """What a model folder says about itself, read without loading it."""

    path: Path
    architecture: str
    kind: str
    model_type: str
    weight_bytes: int  # of the weight files
    stored_bytes_per_param: int  # by the config's dtype (4 when it names none)
    labels: dict[str, int]  # classifier: label name -> index

    @property
    def parameters(self) -> int:
        return self.weight_bytes // self.stored_bytes_per_param

    @property
    def float32_bytes(self) -> int:
        return 4 * self.parameters


def inspect_folder(path: str | Path) -> Folder:
    """Check a model folder (see the module docstring) and read its kind and size; a DataError or ValueError
    naming what is wrong and how to fix it."""
    if not str(path):
        raise ValueError("the hf workload needs a model folder: --path DIR (a folder written by save_pretrained, "
                         "with config.json, the weights and the tokenizer)")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"--path {path}: no such folder; give a folder written by model.save_pretrained(DIR)")
    if not folder.is_dir():
        raise DataError(f"--path {path} is a file, not a folder; give the folder that holds config.json and the "
                        "weights (model.save_pretrained(DIR) writes one)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DataError(f"{folder} is not a Hugging Face model folder: it has no config.json (write one with "
                        "model.save_pretrained(DIR), which also writes the weights)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{config_file} is not valid JSON ({error}); save the model again with "
                        "save_pretrained") from None
    weight_bytes = _weight_bytes(folder)
    architectures = config.get("architectures") or []
    if not architectures:
        raise ValueError(f"{config_file} names no architecture (its 'architectures' list is empty); fewbit reads "
                         "the model's kind from it: save the model with save_pretrained, or add e.g. "
                         "\"architectures\": [\"GPT2LMHeadModel\"]")
    architecture = architectures[0]
    kind = next((k for suffix, k in ARCHITECTURES if architecture.endswith(suffix)), None)
    if kind is None or config.get("is_encoder_decoder"):
        raise ValueError(f"{folder}: fewbit cannot score a {architecture} (an encoder-decoder or a head it has no "
                         "metric for); it scores causal LMs (*ForCausalLM, *LMHeadModel: perplexity), masked LMs "
                         "(*ForMaskedLM) and encoders (*Model: agreement with FP32), and sequence classifiers "
                         "(*ForSequenceClassification: accuracy). Use fewbit.study(model, evaluate=fn) with a "
                         "metric of your own")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return Folder(folder, architecture, kind, str(config.get("model_type", "?")), weight_bytes,
                  DTYPE_BYTES.get(dtype, 4), {str(k): int(v) for k, v in (config.get("label2id") or {}).items()})


def _weight_bytes(folder: Path) -> int:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return (folder / name).stat().st_size
        index = folder / (name + INDEX_SUFFIX)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing or not shards:
                raise DataError(f"{folder} is incomplete: {index.name} lists weight shards that are not there "
                                f"({', '.join(missing[:3]) or 'none listed'}); copy the whole folder")
            return sum((folder / s).stat().st_size for s in shards)
    raise DataError(f"{folder} is incomplete: config.json but no weights ({' or '.join(WEIGHT_FILES)}, or a "
                    "sharded *.index.json); save them with model.save_pretrained(DIR)")


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable from /proc/meminfo, else physical memory (os.sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(folder: Folder, memory_gb: float = 0.0) -> None:
    """A ValueError, before anything is loaded, when :data:`MEMORY_FACTOR` float32 copies of the model do not fit
    in ``memory_gb`` (0: :func:`available_memory`)."""
    limit = memory_gb * 2**30 if memory_gb else available_memory()
    needed = MEMORY_FACTOR * folder.float32_bytes
    if needed > limit:
        raise ValueError(f"{folder.path}: the model is too large for this machine's memory: about "
                         f"{folder.parameters / 1e9:.2f} billion parameters ({folder.weight_bytes / 2**30:.1f} GiB "
                         f"of weight files), so about {needed / 2**30:.1f} GiB in float32 for the FP32 model, a "
                         f"converted copy and the FP32 reference, more than the {limit / 2**30:.1f} GiB "
                         f"{'given by memory_gb' if memory_gb else 'available'}; free memory or use a larger "
                         "machine (--memory-gb GB overrides the estimate's limit)")


# ---- data ---------------------------------------------------------------------------------------------------------


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a DataError when it is missing, empty or not UTF-8 (naming the byte)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"--text {path}: no such file; give a UTF-8 text file")
    data = file.read_bytes()
    if not data.strip():
        raise DataError(f"--text {path} is empty; give a UTF-8 text file with something to score")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"--text {path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} "
                        f"({error.reason}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def split_text(content: str) -> dict[str, str]:
    """A text file's train/valid/test parts: 80/10/10 of its characters, each cut at the next line end."""
    def cut(percent: int) -> int:
        at = len(content) * percent // 100
        newline = content.find("\n", at)
        return len(content) if newline < 0 else newline + 1

    a, b = cut(TRAIN_PERCENT), cut(TRAIN_PERCENT + VALID_PERCENT)
    return {"train": content[:a], "valid": content[a:b], "test": content[b:]}


def embedded_text(max_bytes: int, seed: int) -> dict[str, str]:
    """The lm workload's standard-library corpus as text, split as it splits it."""
    splits = text.load(text.TextCorpus(source="stdlib", max_bytes=max_bytes, seed=seed))
    return {split: text.decode(tokens) for split, tokens in splits.items()}


def sentences_of(content: str, limit: int, embedded: bool) -> list[str]:
    """Non-empty lines (of the embedded corpus: those of 4 to 40 words, stripped), at most ``limit``."""
    lines = [line.strip() for line in content.splitlines()]
    if embedded:
        lines = [line for line in lines if SENTENCE_WORDS[0] <= len(line.split()) <= SENTENCE_WORDS[1]]
    return [line for line in lines if line][:limit]


def read_labelled(lines: list[str], labels: dict[str, int], count: int, where: str) -> list[tuple[int, str]]:
    """``(label index, text)`` of ``label<TAB>text`` lines; a bad label is a DataError naming the line."""
    out = []
    for number, line in enumerate(lines, 1):
        label, _, sentence = line.partition("\t")
        label = label.strip()
        if label.lstrip("-").isdigit():
            index = int(label)
        elif label in labels:
            index = labels[label]
        else:
            raise DataError(f"{where}, line {number}: label {label!r} is neither an index 0..{count - 1} nor one of "
                            f"the model's labels ({', '.join(labels) or 'none'}); lines are label<TAB>text")
        if not 0 <= index < count:
            raise DataError(f"{where}, line {number}: label {index} is outside 0..{count - 1} (the model has "
                            f"{count} labels)")
        out.append((index, sentence.strip()))
    return out


# ---- evaluation samples --------------------------------------------------------------------------------------------


class Windows(Samples):
    """A causal LM's split in non-overlapping windows (:class:`fewbit.workloads.data.text.TokenWindows`);
    references are ``(tokens predicted, UTF-8 bytes of those tokens)`` per window."""

    def __init__(self, split: str, tokens: torch.Tensor, block_size: int, count: int, tokenizer) -> None:
        self.split = split
        self.windows = text.TokenWindows(split, tokens, block_size, count)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.windows)

    def inputs(self, indices):
        return self.windows.inputs(indices)

    def references(self, indices) -> list[tuple[int, int]]:
        out = []
        for i in indices:
            window = self.windows.inputs([i])[0, 1:]
            out.append((window.numel(), len(self.tokenizer.decode(window.tolist()).encode("utf-8"))))
        return out

    def batches(self, batch_size: int) -> list[list[int]]:
        return self.windows.batches(batch_size)

    def groups(self, indices) -> list[list[int]]:
        return self.windows.groups(indices)


class Sentences(Samples):
    """Sentences tokenized in batches; references come from ``reference(indices)`` (FP32 outputs or labels)."""

    def __init__(self, split: str, sentences: list[str], encode, reference, pad_id: int = 0) -> None:
        self.split = split
        self.sentences = sentences
        self.encode = encode
        self.reference = reference
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.sentences)

    def inputs(self, indices):
        return self.encode([self.sentences[i] for i in indices], list(indices))

    def references(self, indices) -> list[Any]:
        return self.reference(list(indices))

    def collate(self, items) -> dict[str, torch.Tensor]:
        """Encoded sentences padded as the tokenizer pads a batch: ids with its pad id, masks with 0, masked-LM
        labels with -100 (ignored)."""
        return collate(items, {"input_ids": self.pad_id, "masked_ids": self.pad_id, "mlm_labels": -100})


# ---- the workload ---------------------------------------------------------------------------------------------------


class HuggingFace(Workload):
    name = "hf"
    description = ("a local Hugging Face model folder (--path DIR): causal LM perplexity, encoder agreement with "
                   "FP32, classifier accuracy; its weights are the baseline")
    metric = "perplexity"  # a causal LM's; an instance sets its own kind's (see the module docstring)
    higher_is_better = False
    secondary = "bits_per_byte"
    pretrained = True  # the runs layer returns the folder's weights as the baseline instead of training
    Config = HFConfig

    def __init__(self, config: HFConfig, artifacts: dict[str, bytes] | None = None) -> None:
        super().__init__(config, artifacts)
        self.folder = inspect_folder(config.path)
        check_memory(self.folder, config.memory_gb)
        self.kind = self.folder.kind
        self.labelled = False
        self._reference_model: nn.Module | None = None
        self._references: dict[tuple[str, int], list[Any]] = {}
        self._metric_names()

    def _metric_names(self) -> None:
        if self.kind == "causal":
            return
        self.higher_is_better = True
        if self.kind in ("masked", "encoder"):
            self.metric = "cosine_mean"
            self.secondary = "mlm_loss" if self.kind == "masked" else "cosine_worst"
        else:
            self.metric = "accuracy" if self.labelled else "agreement"
            self.secondary = None

    @classmethod
    def sources(cls) -> list[Source]:
        from fewbit.workloads.base import installed

        return [
            Source("folder", "a model folder written by save_pretrained (--path DIR), loaded with transformers",
                   installed("transformers"), "pip install transformers"),
            Source("stdlib", "the Python standard library's source, as text or sentences (without --text)", True,
                   "a Python with its stdlib"),
        ]

    @property
    def location(self) -> Path:
        return self.folder.path

    # -- setup -------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        self.require_source("folder")
        transformers = _transformers()
        c = self.config
        if not any((self.folder.path / name).is_file() for name in TOKENIZER_FILES):
            raise DataError(f"{self.folder.path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...); "
                            "save it beside the model with tokenizer.save_pretrained(DIR)")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.folder.path), local_files_only=True)
        if self.tokenizer.pad_token is None:  # decoders often have none; padded positions are masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        config = transformers.AutoConfig.from_pretrained(str(self.folder.path), local_files_only=True)
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.block_size = min(c.block_size, positions) if positions else c.block_size
        self.num_labels = getattr(config, "num_labels", 0)
        embedded = not c.text
        parts = embedded_text(c.max_bytes, c.data_seed) if embedded else split_text(read_text_file(c.text))
        if self.kind == "causal":
            self.tokens = {}
            for split, content in parts.items():
                ids = self.tokenizer(content, add_special_tokens=False, verbose=False)["input_ids"]
                self.tokens[split] = torch.tensor(ids, dtype=torch.long)
                if self.tokens[split].numel() < 2:
                    raise DataError(f"the {split} split of {c.text or 'the embedded corpus'} holds "
                                    f"{self.tokens[split].numel()} token(s); a causal LM needs at least 2 per split "
                                    "(give a longer text)")
            return
        self.sentences = {split: sentences_of(content, c.sentences, embedded) for split, content in parts.items()}
        self.labels: dict[str, list[int]] = {}
        if self.kind == "classifier" and not embedded and all("\t" in s for s in self.sentences["train"][:1]):
            self.labelled = True
            for split, lines in self.sentences.items():
                rows = read_labelled(lines, self.folder.labels, self.num_labels, f"{c.text} ({split} part)")
                self.labels[split] = [label for label, _ in rows]
                self.sentences[split] = [sentence for _, sentence in rows]
            self._metric_names()
        for split, sentences in self.sentences.items():
            if not sentences:
                raise DataError(f"the {split} split of {c.text or 'the embedded sentences'} has no sentences; give "
                                "a file of at least 10 non-empty lines")

    def info(self) -> dict:
        data = {"path": str(self.folder.path), "architecture": self.folder.architecture, "kind": self.kind,
                "parameters": self.folder.parameters, "text": self.config.text or "embedded (stdlib)"}
        if self.kind == "causal":
            return {**data, **{f"{k}_tokens": int(v.numel()) for k, v in self.tokens.items()}}
        return {**data, "labelled": self.labelled, **{f"{k}_sentences": len(v) for k, v in self.sentences.items()}}

    # -- the model -----------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The folder's model in float32 (its pretrained weights; nothing is initialized at random)."""
        transformers = _transformers()
        cls = getattr(transformers, self.folder.architecture, None)
        if cls is None:
            raise ValueError(f"{self.folder.path}: this transformers {transformers.__version__} has no class "
                             f"{self.folder.architecture}; upgrade transformers (pip install -U transformers)")
        progress = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            model = cls.from_pretrained(str(self.folder.path), local_files_only=True, dtype=torch.float32)
        except OSError as error:
            raise DataError(f"{self.folder.path} could not be loaded offline: {error}") from None
        finally:
            if progress:
                transformers.utils.logging.enable_progress_bar()
        return model.eval()

    def reference_model(self) -> nn.Module:
        """The FP32 model the agreement metrics compare with (loaded once, kept)."""
        if self._reference_model is None:
            self._reference_model = self.build_model()
        return self._reference_model

    # -- training --------------------------------------------------------------------------------------------------
    def _draw(self, step: int, micro: int, count: int) -> list[int]:
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) * 64 + micro)
        return torch.randint(0, count, (self.config.batch_size,), generator=generator).tolist()

    def batch(self, step: int, micro: int = 0) -> Any:
        c = self.config
        if self.kind == "causal":
            return text.sample_batch(self.tokens["train"], c.batch_size, min(self.block_size, self.tokens["train"]
                                     .numel() - 1), step * 64 + micro, c.seed)
        chosen = self._draw(step, micro, len(self.sentences["train"]))
        batch = self._encode([self.sentences["train"][i] for i in chosen], chosen)
        if self.labelled:
            batch["labels"] = torch.tensor([self.labels["train"][i] for i in chosen])
        return batch

    def synthetic_batch(self, generator: torch.Generator) -> Any:
        """A training batch of random tokens in :meth:`batch`'s shape and keys, for a warm-up that reads no
        example (timed runs): ``(ids, targets)`` for a causal LM, else the encoded sentences (masked tokens and
        labels included where the kind has them)."""
        c = self.config
        vocab = len(self.tokenizer)
        if self.kind == "causal":
            ids = torch.randint(0, vocab, (c.batch_size, self.block_size), generator=generator)
            return ids, torch.roll(ids, -1, dims=1)
        length = min(self.block_size, 16)
        ids = torch.randint(0, vocab, (c.batch_size, length), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.kind == "masked":
            batch["masked_ids"] = ids
            batch["mlm_labels"] = ids
        if self.labelled:
            batch["labels"] = torch.randint(0, max(self.labels["train"]) + 1, (c.batch_size,), generator=generator)
        return batch

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        model = unwrap(model)
        if self.kind == "causal":
            ids, targets = batch
            logits = model(input_ids=ids).logits.float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if self.kind == "masked":
            out = model(input_ids=batch["masked_ids"], attention_mask=batch["attention_mask"])
            return F.cross_entropy(out.logits.float().transpose(1, 2), batch["mlm_labels"], ignore_index=-100)
        encoded = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.kind == "classifier":
            logits = model(**encoded).logits.float()
            if "labels" in batch:
                return F.cross_entropy(logits, batch["labels"])
            with torch.no_grad():
                target = self.reference_model()(**_to(encoded, logits.device)).logits.float().log_softmax(-1)
            return F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
        embedding = _pooled(model, encoded)
        with torch.no_grad():
            target = _pooled(self.reference_model(), _to(encoded, embedding.device))
        return (1 - F.cosine_similarity(embedding, target, dim=-1)).mean()

    # -- evaluation ------------------------------------------------------------------------------------------------
    def _encode(self, sentences: list[str], indices: list[int]) -> dict[str, torch.Tensor]:
        """Tokenized, padded sentences; for a masked LM also ``masked_ids`` and ``mlm_labels``: 15% of each
        sentence's ordinary tokens (drawn from its index, so the same every time) replaced by the mask token."""
        encoded = dict(self.tokenizer(sentences, padding=True, truncation=True, max_length=self.block_size,
                                      return_tensors="pt"))
        if self.kind == "masked":
            ids = encoded["input_ids"]
            special = torch.tensor(self.tokenizer.all_special_ids)
            ordinary = ~torch.isin(ids, special) & encoded["attention_mask"].bool()
            draws = torch.stack([torch.rand(ids.shape[1], generator=torch.Generator().manual_seed(
                zlib.crc32(f"mask:{i}".encode()))) for i in indices])
            masked = ordinary & (draws < MASK_PERCENT / 100)
            encoded["masked_ids"] = ids.masked_fill(masked, self.tokenizer.mask_token_id)
            encoded["mlm_labels"] = ids.masked_fill(~masked, -100)
        return encoded

    def samples(self, split: str, limit: int = 0) -> Samples:
        self.check_split(split)
        if self.kind == "causal":
            tokens = self.tokens[split]
            return Windows(split, tokens, self.block_size, limited(split, tokens.numel(), limit), self.tokenizer)
        sentences = self.sentences[split][:limited(split, len(self.sentences[split]), limit)]
        return Sentences(split, sentences, self._encode, lambda indices: self._reference(split, sentences, indices),
                         self.tokenizer.pad_token_id or 0)

    def _reference(self, split: str, sentences: list[str], indices: list[int]) -> list[Any]:
        """Per sentence: its label (labelled classifier), the FP32 model's label, or the FP32 model's embedding."""
        if self.labelled:
            return [self.labels[split][i] for i in indices]
        key = (split, len(sentences))
        if key not in self._references:
            model = self.reference_model()
            out: list[Any] = []
            with torch.no_grad():
                for start in range(0, len(sentences), self.eval_batch_size):
                    chunk = list(range(start, min(start + self.eval_batch_size, len(sentences))))
                    encoded = _to(self._encode([sentences[i] for i in chunk], chunk), model_device(model))
                    if self.kind == "classifier":
                        out += model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]) \
                            .logits.argmax(-1).tolist()
                    else:
                        out += list(_pooled(model, encoded).float().cpu())
            self._references[key] = out
        return [self._references[key][i] for i in indices]

    def predict(self, model: Model, inputs) -> list[Any]:
        if self.kind == "causal":
            windows = inputs.to(model_device(model))
            logits = _call(model, input_ids=windows[:, :-1]).logits.float()
            return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").sum(-1).tolist()
        inputs = _to(inputs, model_device(model))
        encoded = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if self.kind == "classifier":
            return _call(model, **encoded).logits.argmax(-1).tolist()
        embeddings = list(_pooled(model, encoded).float().cpu())
        if self.kind == "encoder":
            return [(e, 0.0, 0) for e in embeddings]
        logits = _call(model, input_ids=inputs["masked_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), inputs["mlm_labels"], ignore_index=-100, reduction="none")
        counts = (inputs["mlm_labels"] != -100).sum(-1)
        return [(e, float(n), int(k)) for e, n, k in zip(embeddings, nll.sum(-1).tolist(), counts.tolist(),
                                                        strict=True)]

    def score(self, outputs, references) -> dict[str, float]:
        if self.kind == "causal":
            tokens = sum(r[0] for r in references)
            nll = sum(outputs) / tokens
            return {"nll": nll, "perplexity": math.exp(nll),
                    "bits_per_byte": sum(outputs) / math.log(2) / max(sum(r[1] for r in references), 1),
                    "tokens": tokens}
        if self.kind == "classifier":
            hits = sum(int(o == r) for o, r in zip(outputs, references, strict=True))
            return {self.metric: 100.0 * hits / len(outputs), "examples": len(outputs)}
        cosine = F.cosine_similarity(torch.stack([o[0] for o in outputs]), torch.stack(list(references)), dim=-1)
        metrics = {"cosine_mean": 100.0 * float(cosine.mean()), "cosine_worst": 100.0 * float(cosine.min()),
                   "sentences": len(outputs)}
        if self.kind == "masked":
            masked = sum(o[2] for o in outputs)
            metrics["mlm_loss"] = sum(o[1] for o in outputs) / masked if masked else float("nan")
            metrics["masked_tokens"] = masked
        return metrics


# ---- fewbit's GPT in Hugging Face format ---------------------------------------------------------------------------


def gpt2_config(config) -> Any:
    """The ``GPT2Config`` of a fewbit :class:`~fewbit.workloads.models.gpt.GPTConfig`: the same shape, exact GELU
    (fewbit's ``nn.GELU``; GPT-2's default is the tanh approximation), LayerNorm eps 1e-5, no dropout."""
    transformers = _transformers()
    return transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                   n_embd=config.d_model, n_layer=config.layers, n_head=config.heads,
                                   n_inner=config.d_ff, activation_function="gelu", layer_norm_epsilon=1e-5,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                                   bos_token_id=None, eos_token_id=None, architectures=["GPT2LMHeadModel"])


def gpt_to_hf(model: nn.Module) -> nn.Module:
    """A ``GPT2LMHeadModel`` with the weights of fewbit's :class:`~fewbit.workloads.models.gpt.GPT` ``model``
    (copies; same logits). GPT-2's ``Conv1D`` stores ``(in, out)``, so every projection is transposed: ``qkv``
    (Q, K, V stacked along the output, heads contiguous, as GPT-2 splits them) to ``c_attn``, ``out`` to
    ``c_proj``, the MLP's two layers to ``c_fc`` and ``c_proj``; embeddings and LayerNorms map one to one, and
    the output head is tied to the token embedding in both."""
    transformers = _transformers()
    hf = transformers.GPT2LMHeadModel(gpt2_config(model.config)).eval()
    state = {"transformer.wte.weight": model.tokens.weight, "transformer.wpe.weight": model.positions.weight,
             "transformer.ln_f.weight": model.norm.weight, "transformer.ln_f.bias": model.norm.bias}
    for i, block in enumerate(model.blocks):
        prefix = f"transformer.h.{i}."
        pairs = {"ln_1": block.norm1, "ln_2": block.norm2}
        for name, norm in pairs.items():
            state[prefix + name + ".weight"], state[prefix + name + ".bias"] = norm.weight, norm.bias
        for name, linear in {"attn.c_attn": block.attn.qkv, "attn.c_proj": block.attn.out,
                             "mlp.c_fc": block.mlp[0], "mlp.c_proj": block.mlp[2]}.items():
            state[prefix + name + ".weight"] = linear.weight.t()
            state[prefix + name + ".bias"] = linear.bias
    missing, unexpected = hf.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()},
                                             strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise RuntimeError(f"gpt_to_hf: the mapping left GPT-2 weights unset {missing[:4]} or unused {unexpected[:4]}")
    hf.tie_weights()
    return hf


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` whose token ids are the UTF-8 bytes of the text (fewbit's lm vocabulary):
    byte-level BPE with no merges, GPT-2's byte-to-character table as its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    transformers = _transformers()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def export_lm(run_path: str | Path, out: str | Path) -> Path:
    """Save a fewbit ``lm`` run (its folder) as a Hugging Face folder: ``GPT2LMHeadModel`` weights
    (:func:`gpt_to_hf`), ``config.json`` and the byte tokenizer (:func:`byte_tokenizer`), so that
    ``fewbit study hf --path OUT`` and any ``transformers`` code load it offline. Returns ``out``."""
    from fewbit.workloads import runs

    run = runs.load(run_path)
    if run.workload.name != "lm":
        raise ValueError(f"{run_path} holds a {run.workload.name!r} run; export to Hugging Face format takes an lm "
                         "run (fewbit train lm --out DIR)")
    out = Path(out)
    gpt_to_hf(run.model.float()).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _call(model: Model, **inputs):
    return model(**inputs)


def _pooled(model: Model, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over each sentence's tokens (padding left out) of the last hidden state: (B, hidden)."""
    out = _call(model, input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out.last_hidden_state
    mask = encoded["attention_mask"].to(hidden.dtype)[..., None]
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)


__all__ = ["Folder", "HFConfig", "HuggingFace", "byte_tokenizer", "check_memory", "export_lm", "gpt2_config",
           "gpt_to_hf", "inspect_folder", "read_text_file"]
