"""Fine-tune GPT-2 to classify text: chapter 06's pipeline end to end. This is the main job.

`pipeline` reads as the chapter's "Pipeline de treinamento para classificação":

    1. texto rotulado            load_labelled_text         train / validation / test (data.py)
    2. tokenização               tokenize                   GPT-2's token ids, cut to max_length
    3. processamento pelo GPT    load_gpt                   pretrained GPT-2 (or random: --init random)
    4. extração de representação build_classifier           the last real token's vector (classify.py)
    5. camada de classificação   build_classifier           a new Linear(C -> classes); then freezing
    6. cálculo da loss           supervised_loss            cross-entropy against the labels
    7. atualização dos pesos     fine_tune                  AdamW over the trainable weights only

then evaluates the classifier with the chapter's metrics (metrics.py) and saves it for
classify.py. `fine_tune` is the loop: forward, loss, zero_grad, backward, step.

Machinery the chapter never mentions wraps the pipeline from outside (`runner.run`): the flags and
their checks, torchrun (distributed.py), the run folder that appears only when complete, several
strategies and seeds side by side (comparison.py), downloads (hub.py).

    python train.py                                   # the book's experiment
    python train.py --data SMSSpamCollection --init random --epochs 1   # offline
    python train.py --compare head,last-block,all     # the strategies side by side
    python train.py --compare head,last-block --seeds 3   # ... each trained with 3 seeds: spread, significance
    torchrun --nproc_per_node=4 train.py              # the same experiment on 4 GPUs
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

if __name__ == "__main__":  # torch warns at import when NumPy is missing; this project does not use NumPy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch
from torch import nn
from torch.nn import functional as F

import classify
import data
import distributed
import evaluation
import fastpath
import gpt
import hub
import metrics
import report
import runner


@dataclass
class TrainConfig:
    """Everything one run depends on. The defaults are the book's experiment."""

    data: str | None = None  # None: download the SMS Spam Collection
    validation_data: str | None = None
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    delimiter: str | None = None  # None: the one among , ; tab | that splits the header into the named columns
    encoding: str = "utf-8"  # Excel on Windows saves cp1252
    balanced: bool = True  # the book undersamples ham to the 747 spam messages
    dedup: bool = False  # True (--dedup): drop repeated texts before splitting (the book keeps them)
    model: str = "gpt2-small"
    init: str = "pretrained"  # or "random": same architecture, random weights
    strategy: str = "last-block"
    pooling: str = "last"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    epochs: int = 5
    batch_size: int = 8  # texts per weight update
    accumulation_steps: int = 1  # each update adds this many micro-batches (smaller ones fit smaller GPUs)
    lr: float = 5e-5
    schedule: str = "constant"  # or "linear", "cosine": the decay from lr to 0 over the run
    warmup: int = 0  # updates whose learning rate rises linearly from 0 to lr
    max_grad_norm: float | None = None  # clip the gradient's norm to this (None: no clipping)
    class_weights: str = "none"  # "balanced" (--class-weights): the loss weighted by inverse class frequency
    weight_decay: float = 0.1
    precision: str = "auto"  # autocast dtype: auto (by the card), fp32, bf16, fp16
    max_length: int | None = None  # None: the longest training text (at most the context length)
    seed: int = 123
    device: str = "auto"
    out: str | None = None  # None: runs/<timestamp>
    save: str = "trained"  # or "full": every weight, not only the trained ones beside the starting weights' identity
    eval_every: int = 0  # 0: evaluate only at the end of each epoch
    plot: bool = False
    compare: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # training seeds (--seeds); empty: --seed alone
    reference: str | None = None  # the strategy the others are tested against; None: last-block, or the first
    cache_dir: str | None = None
    compile: bool = False
    use_prefix_cache: bool = True  # False (--no-cache): the frozen blocks run at every step


# --------------------------------------------------------------------------- the pipeline


def pipeline(cfg: TrainConfig, job: runner.Job) -> list[RunResult]:
    """The chapter's pipeline, in order: steps 1-3 once, then for each strategy and training seed
    (one of each without --compare and --seeds) steps 4-7, the evaluation, and the classifier
    saved for classify.py. Every run starts from the same texts and the same GPT-2."""
    splits = load_labelled_text(cfg)  # 1. texto rotulado
    tokens = data.tokenize(splits, cfg.max_length, job.text_tokens)  # 2. tokenização
    gpt_model = load_gpt(cfg, job.gpt_config, job.log)  # 3. processamento pelo GPT (its pretrained weights)
    class_weights = data.class_weights(splits.train) if cfg.class_weights == "balanced" else None  # for step 6
    job.log(report.describe_steps(cfg, splits, tokens, gpt_model, job, class_weights))
    shelf = share_frozen_work(gpt_model, tokens, len(splits.label_names), job)  # several runs: frozen work once
    results = []
    runs = list(itertools.product(cfg.compare or [cfg.strategy], cfg.seeds or [cfg.seed]))
    for strategy, seed in runs:
        if strategy in evaluation.BASELINES:  # no GPT-2: what fine-tuning is measured against
            results.append(fit_baseline(strategy, tokens, splits, seed, class_weights, job))
            continue
        model = build_classifier(gpt_model, len(splits.label_names), cfg.pooling, seed)  # 4-5. representação, head
        freeze(model, strategy, seed, cfg)  # "Congelamento de Camadas": what trains
        job.detail(describe_strategy(model, strategy, seed if cfg.seeds else None, job, tokens.max_length))
        parameters = report.parameter_counts(model)  # what trains from the start (gradual: then more)
        inputs = {name: fastpath.SplitInputs(dataset, shelf=shelf.get(name, {})) for name, dataset in tokens.items()}
        training = fine_tune(model, inputs, strategy, seed, job, class_weights)  # 6-7. loss, atualização dos pesos
        restore_state(model, training.best_state)  # the weights of the best epoch
        reports, losses, test = evaluate_splits(model, inputs, splits.label_names, job)  # avaliação
        results.append(RunResult(strategy, reports, losses, parameters, training, seed, test.y_pred,
                                 list(tokens.test.labels), test.probabilities))
        job.log(report.describe_result(results[-1], tokens, brief=len(runs) > 1, seeded=bool(cfg.seeds))
                + ("" if len(runs) > 1 else "\n" + evaluation.describe_mistakes(results[-1], tokens)))
        job.save(model, results[-1], tokens, splits)  # inferência: classify.py loads it
    return results


def load_labelled_text(cfg: TrainConfig) -> data.Splits:
    """Step 1, "Texto rotulado": texts with their classes, split into train / validation / test."""
    return data.load_splits(cfg.data, seed=cfg.seed, balanced=cfg.balanced, text_column=cfg.text_column,
                            label_column=cfg.label_column, validation_path=cfg.validation_data,
                            test_path=cfg.test_data, cache_dir=cfg.cache_dir, progress=hub.print_progress,
                            delimiter=cfg.delimiter, encoding=cfg.encoding, dedup=cfg.dedup)


def load_gpt(cfg: TrainConfig, gpt_config: gpt.GPTConfig | None = None,
             log: Callable[[str], None] = report.quiet) -> gpt.GPTModel:
    """Step 3, "Processamento pelo GPT": the pretrained model, or the same architecture with random
    weights (`gpt_config`: the shape, when not --model's own)."""
    gpt_config = gpt_config or gpt.load_config(cfg.model)
    if cfg.init == "random":
        torch.manual_seed(cfg.seed)
        return gpt.GPTModel(gpt_config)
    weights = hub.fetch(cfg.model, cfg.cache_dir, hub.print_progress)  # a preset: its file, downloaded once
    log(f"3. GPT: weights from {weights}")
    return gpt.load_gpt2(weights, config=gpt_config)


def build_classifier(gpt_model: gpt.GPTModel, num_classes: int, pooling: str, seed: int) -> classify.GPTClassifier:
    """Steps 4 and 5: GPT's hidden state at one position (or a mean) represents the text, and a new
    linear head maps it to one logit per class, replacing the vocabulary head. Each run trains its
    own copy: every strategy starts from the same weights."""
    torch.manual_seed(seed)  # the head's random initialisation
    return classify.GPTClassifier(copy.deepcopy(gpt_model), num_classes, pooling=pooling)


def freeze(model: classify.GPTClassifier, strategy: str, seed: int, cfg: TrainConfig) -> None:
    """"Congelamento de Camadas": only what `strategy` trains keeps requires_grad (LoRA's
    adapters are inserted here, initialised from `seed`)."""
    torch.manual_seed(seed)  # LoRA adapters start at random
    classify.apply_strategy(model, strategy, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)


# --------------------------------------------------------------------------- steps 6-7: the loop


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Step 6, "Cálculo da loss supervisionada": cross-entropy, minus the log-probability the model
    gives each text's true class, averaged over the batch. logits (B, K), labels (B,). With
    class weights (K,) (--class-weights balanced) each text's term is multiplied by its class's
    weight and the sum divided by the batch's total weight: a weighted mean, where a rare class
    counts as much as a common one."""
    return F.cross_entropy(logits, labels, weight=class_weights)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Step 7's optimizer, AdamW, given only the trainable parameters: a frozen weight gets no
    gradient and no weight decay. The fused kernel does the whole update in one pass over memory
    (about 40x faster than the per-tensor loop for last-block's 7M parameters on a 2-core CPU;
    the same arithmetic)."""
    parameters = [param for param in model.parameters() if param.requires_grad]
    try:
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device in this PyTorch
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def fine_tune(model: classify.GPTClassifier, inputs: dict[str, fastpath.SplitInputs], strategy: str, seed: int,
              job: runner.Job, class_weights: torch.Tensor | None = None) -> Training:
    """Steps 6 and 7, epoch after epoch ("Treinamento Supervisionado"), each epoch then measured on
    the validation set. Keeps a copy of the weights of the epoch with the best validation
    accuracy (of equals, the lower loss, then the earlier epoch)."""
    cfg, device, log = job.cfg, job.runtime.device, job.detail
    started = time.perf_counter()
    model.to(device)
    compile_blocks(model, cfg, device, log)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=job.precision == torch.float16)  # float16 needs it
    network = distributed.wrap(model, job.runtime)  # torchrun: the processes' gradients added up, each by its share
    # "Congelamento de Camadas": the frozen blocks give the same output every epoch, so each text
    # runs through them once, here, and training continues from their stored output.
    with mixed_precision(job):
        cache = fastpath.refresh_caches(model, inputs, device, cfg.use_prefix_cache, job.progress)
    training = Training(cache, trainable_state(model))
    log(report.describe_cache(training.cache))
    lengths = inputs["train"].dataset.lengths
    weights = None if class_weights is None else class_weights.to(device)  # step 6: --class-weights
    text_weights = None if class_weights is None else class_weights[inputs["train"].dataset.labels].tolist()
    steps = -(-len(lengths) // cfg.batch_size)  # weight updates per epoch
    progress = report.Progress(total_steps=cfg.epochs * steps, log_every=max(1, steps // 10))
    for epoch in range(cfg.epochs):
        epoch_started = time.perf_counter()
        if strategy == "gradual" and epoch > 0 and unfreeze_next_block(model, optimizer, training, epoch):
            del network  # under torchrun the old DDP and its gradient hooks go first
            network = distributed.wrap(model, job.runtime)  # DDP must see the new trainable set
            with mixed_precision(job):
                training.set_cache(fastpath.refresh_caches(model, inputs, device, cfg.use_prefix_cache, job.progress))
            log(f"epoch {epoch + 1}: unfrozen, now training {report.describe_trainable(model)}; "
                f"{report.describe_cache(training.cache)}")
        trainable = report.describe_trainable(model)
        batches = data.bucket_batches(lengths, cfg.batch_size, seed, epoch)  # a new order every epoch
        loss_sum = torch.zeros((), device=device)  # this process's texts, summed on the device: no sync per step
        correct, seen = torch.zeros((), dtype=torch.long, device=device), 0
        model.train()
        for step, (indices, size) in enumerate(distributed.shard(batches, job.runtime, text_weights), start=1):
            optimizer.zero_grad(set_to_none=True)
            parts = micro_batches(indices, cfg.accumulation_steps)  # one part, unless --accumulation-steps
            for part, share in zip(parts, shares_of(parts, text_weights)):
                batch = inputs["train"].batch(part, device)  # token ids, or the frozen blocks' output
                with mixed_precision(job), distributed.held(network, part is not parts[-1]):
                    logits = network(batch.inputs, batch.lengths, batch.start_block).float()  # steps 3-5: (B, K)
                loss = supervised_loss(logits, batch.labels, weights)  # step 6
                scaler.scale(loss * share if len(parts) > 1 else loss).backward()  # reaches trainable weights only
                if len(part):  # a torchrun process's share may be empty (the mean of nothing is NaN)
                    loss_sum += loss.detach() * share * job.runtime.share * size  # as a part of the batch's mean
                    correct += (logits.argmax(dim=-1) == batch.labels).sum()
            update_weights(optimizer, scaler, cfg, progress.step, progress.total_steps)  # step 7
            seen += size  # the whole batch's texts, on every process
            progress.advance(size)
            check_now = cfg.eval_every > 0 and progress.step % cfg.eval_every == 0
            if check_now or step % progress.log_every == 0 or step == steps:
                line = progress.line(epoch, cfg.epochs, step, steps, finite(per_text(job, loss_sum, seen), "training"))
                if check_now:
                    check = evaluate(model, inputs["validation"], job)
                    model.train()
                    training.step_checks.append({"step": progress.step, "validation_loss": check.loss})
                    line += f"  validation loss {check.loss:.4f}"
                job.progress(line)
        train_loss, train_accuracy = finite(per_text(job, loss_sum, seen), "training"), per_text(job, correct, seen)
        validation = evaluate(model, inputs["validation"], job)
        record = EpochRecord(epoch + 1, trainable, train_loss, train_accuracy, finite(validation.loss, "validation"),
                             validation.accuracy)
        training.history.append(record)
        training.epoch_seconds.append(time.perf_counter() - epoch_started)
        best = max(training.history, key=lambda r: (r.validation_accuracy, -r.validation_loss))  # first of equals
        if best is record:
            training.best_epoch, training.best_state = record.epoch, trainable_state(model)
        log(report.epoch_line(record, cfg.epochs, training))
    training.seconds = time.perf_counter() - started
    return training


def shares_of(parts: list[list[int]], text_weights: list[float] | None) -> list[float]:
    """Each micro-batch's share of this process's part of the batch's (weighted) mean loss: its share
    of the texts, or with --class-weights of their weight, so that the parts add up to the whole."""
    sizes = [len(part) if text_weights is None else sum(text_weights[i] for i in part) for part in parts]
    total = sum(sizes)
    return [size / total if total else 0.0 for size in sizes]


def micro_batches(indices: list[int], parts: int) -> list[list[int]]:
    """A batch cut into at most `parts` consecutive micro-batches whose sizes differ by one at most,
    for --accumulation-steps; always one at least, possibly empty (a torchrun process's empty share)."""
    parts = max(1, min(parts, len(indices)))
    size, longer = divmod(len(indices), parts)  # the first `longer` micro-batches take one text more
    starts = [0, *itertools.accumulate([size + 1] * longer + [size] * (parts - longer))]
    return [indices[start:end] for start, end in zip(starts, starts[1:])]


def update_weights(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, cfg: TrainConfig, step: int,
                   total_steps: int) -> None:
    """Step 7, "Atualização dos pesos": this update's learning rate (--schedule, --warmup), the
    gradient's norm clipped (--max-grad-norm), then AdamW's step. In float16 the scaler first
    divides the gradients back, and an update whose gradients overflowed is skipped (the scale
    is lowered for the next)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, total_steps, cfg)
    if cfg.max_grad_norm is not None:
        scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm)
    scaler.step(optimizer)  # optimizer.step(), unless float16 gradients overflowed
    scaler.update()


def learning_rate(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of update `step` (0, 1, ...): rising linearly from lr / warmup to lr over
    --warmup updates, then --schedule: constant (the book's), or a linear or cosine decay from lr
    toward 0 at the end of the run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decayed = (step - cfg.warmup) / max(total_steps - cfg.warmup, 1)  # 0 at the first update after warmup
    if cfg.schedule == "linear":
        return cfg.lr * (1 - decayed)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * decayed))
    return cfg.lr


def mixed_precision(job: runner.Job) -> torch.autocast:
    """Autocast in the precision chosen for the card (distributed.pick_precision); float32: off."""
    device = job.runtime.device
    return torch.autocast(device.type, dtype=job.precision, enabled=job.precision != torch.float32)


def per_text(job: runner.Job, total: torch.Tensor, texts: int) -> float:
    """A sum over this process's texts, added up over every process (torchrun), per text."""
    return job.runtime.sum(total).item() / texts


def finite(loss: float, which: str) -> float:
    """`loss`; a loss that stopped being finite stops the run: no model of NaNs is saved as if it trained."""
    if not math.isfinite(loss):
        raise ValueError(f"the {which} loss became {loss}: training diverged (try a lower --lr, or --lora-alpha "
                         "for lora); no run folder was written")
    return loss


def unfreeze_next_block(model: classify.GPTClassifier, optimizer: torch.optim.Optimizer, training: Training,
                        epoch: int) -> bool:
    """The "gradual" strategy at `epoch` ("liberar gradualmente"): one more block trains, and the
    optimizer learns of its weights; returns whether anything changed."""
    classify.apply_strategy(model, "gradual", epoch=epoch)
    for name, value in trainable_state(model).items():
        training.best_state.setdefault(name, value)  # its value at the best epoch so far: it was frozen
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in known]
    if new:
        optimizer.add_param_group({"params": new})  # lr and weight decay from the optimizer's defaults
    return bool(new)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights: all that training changes."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


def compile_blocks(model: classify.GPTClassifier, cfg: TrainConfig, device: torch.device,
                   log: Callable[[str], None]) -> None:
    """--compile: torch.compile each block (CUDA only), the same module, faster kernels."""
    if cfg.compile and device.type != "cuda":
        log(f"--compile: only used on CUDA; running uncompiled on {device.type}")
    elif cfg.compile and not hasattr(nn.Module, "compile"):
        log("--compile: needs PyTorch 2.2 or later; running uncompiled")
    elif cfg.compile:
        for block in model.gpt.h:
            block.compile(dynamic=True)


# --------------------------------------------------------------------------- what fine-tuning leaves


@dataclass
class EpochRecord:
    epoch: int
    trainable: str  # what was trained this epoch (the gradual schedule)
    train_loss: float  # mean over the epoch's texts, measured while training
    train_accuracy: float  # likewise
    validation_loss: float
    validation_accuracy: float


@dataclass
class Training:
    """What fine-tuning produced: the history, and the weights of the best epoch (by validation
    accuracy, then loss); train.fine_tune fills it."""

    cache: fastpath.CacheStatus  # as in the last epoch
    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord] = field(default_factory=list)
    step_checks: list[dict] = field(default_factory=list)  # validation loss every --eval-every steps
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0
    cache_seconds: float = 0.0  # building the cache, every (re)build
    seconds: float = 0.0  # the whole of fine-tuning: cache and epochs

    def __post_init__(self) -> None:
        self.cache_seconds += self.cache.seconds

    def set_cache(self, cache: fastpath.CacheStatus) -> None:
        self.cache, self.cache_seconds = cache, self.cache_seconds + cache.seconds


@dataclass
class RunResult:
    strategy: str
    reports: dict[str, metrics.ClassificationReport]
    losses: dict[str, float]
    parameters: dict[str, float]
    training: Training
    seed: int | None = None  # the training seed
    test_predictions: list[int] = field(default_factory=list)  # text by text, in the test split's order
    test_labels: list[int] = field(default_factory=list)
    test_probabilities: list[list[float]] = field(default_factory=list)  # each class's, text by text

    @property
    def training_seconds(self) -> float:
        return self.training.seconds


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Loss and predictions over one whole split, in the split's order."""

    loss: float
    y_true: list[int]
    y_pred: list[int]
    probabilities: list[list[float]] = field(default_factory=list)  # softmax of the logits, text by text

    @property
    def accuracy(self) -> float:
        return metrics.accuracy(self.y_true, self.y_pred)


@torch.no_grad()
def evaluate(model: classify.GPTClassifier, split: fastpath.SplitInputs, job: runner.Job,
             name: str = "validation") -> Evaluation:
    """Mean loss and every prediction over a split, in batches ordered by length."""
    model.eval()
    device, loss_sum, predictions = job.runtime.device, 0.0, [0] * len(split.dataset)
    ticker = report.Ticker(f"evaluating on {name}", sum(split.dataset.lengths), job.progress)
    probabilities: list[list[float]] = [[]] * len(split.dataset)
    for indices in data.bucket_batches(split.dataset.lengths, job.eval_batch_size):  # in order of length
        ticker.add(sum(split.dataset.lengths[i] for i in indices))  # the work grows with the tokens
        batch = split.batch(indices, device)
        with mixed_precision(job):
            logits = model(batch.inputs, batch.lengths, batch.start_block).float()  # (B, K)
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        for i, prediction, p in zip(indices, logits.argmax(dim=-1).tolist(), logits.softmax(dim=-1).tolist()):
            predictions[i], probabilities[i] = prediction, p
    return Evaluation(loss_sum / len(split.dataset), list(split.dataset.labels), predictions, probabilities)


def evaluate_splits(model: classify.GPTClassifier, inputs: dict[str, fastpath.SplitInputs], label_names: list[str],
                    job: runner.Job) -> tuple[dict[str, metrics.ClassificationReport], dict[str, float], Evaluation]:
    """The chapter's metrics ("Avaliando classificadores de texto") on every split; also the test
    split's predictions and probabilities, text by text (to compare strategies on the same texts,
    and to list the mistakes)."""
    with mixed_precision(job):
        fastpath.refresh_caches(model, inputs, job.runtime.device, job.cfg.use_prefix_cache)  # training's, if it can
    reports, losses, found = {}, {}, {}
    for name, split in inputs.items():
        found[name] = evaluate(model, split, job, name)
        reports[name] = metrics.classification_report(found[name].y_true, found[name].y_pred, label_names)
        losses[name] = found[name].loss
    return reports, losses, found["test"]


# --------------------------------------------------------------------------- what trains, and whether it fits


def describe_strategy(model: classify.GPTClassifier, strategy: str, seed: int | None, job: runner.Job,
                      max_length: int) -> str:
    """What trains, and, on a GPU, whether the run will fit in its memory."""
    parameters, epochs = report.parameter_counts(model), job.cfg.epochs
    line = (f"strategy {strategy}{'' if seed is None else f', training seed {seed}'}: training "
            f"{report.describe_trainable(model)}: {parameters['trainable']:,} of "
            f"{parameters['total']:,} parameters ({parameters['share']:.2%})")
    n_layers = len(model.gpt.h)
    if strategy == "gradual":
        counts = [classify.trainable_blocks("gradual", n_layers, epoch) for epoch in range(epochs)]
        line += "\ngradual schedule: " + "; ".join(
            f"epoch {epoch + 1}: head + final LayerNorm" + (f" + top {n} block{'s' if n > 1 else ''}" if n else "")
            for epoch, n in enumerate(counts))
    if job.runtime.device.type == "cuda":
        trained = n_layers if strategy == "lora" else classify.trainable_blocks(strategy, n_layers, epochs - 1)
        free, _ = torch.cuda.mem_get_info(job.runtime.device)
        line += "\n" + describe_memory(parameters, trained, model.gpt.cfg, job, max_length, free)
    return line


def describe_memory(parameters: dict[str, float], trained_blocks: int, gpt_config: gpt.GPTConfig, job: runner.Job,
                    max_length: int, free_bytes: int) -> str:
    """The estimated peak memory of a training step against what the GPU has free; when it will not
    fit, the fewest micro-batches (--accumulation-steps) that would."""
    cfg = job.cfg

    def need(parts: int) -> int:
        return distributed.training_bytes(int(parameters["total"]), int(parameters["trainable"]), trained_blocks,
                                          gpt_config.emb_dim, gpt_config.n_heads, -(-cfg.batch_size // parts),
                                          max_length, job.precision)

    needed = need(cfg.accumulation_steps)
    line = (f"memory: about {needed / 2**30:.1f} GiB at the peak of a step (an estimate), "
            f"{free_bytes / 2**30:.1f} GiB free on {job.runtime.device}")
    if needed <= free_bytes:
        return line
    parts_to_try = range(cfg.accumulation_steps, cfg.batch_size + 1)
    fits = next((parts for parts in parts_to_try if need(parts) <= free_bytes), None)
    advice = (f"--accumulation-steps {fits} (about {need(fits) / 2**30:.1f} GiB)" if fits else
              "a smaller --max-length or --model")
    return line + f"; it will probably NOT fit: try {advice}, or a strategy that trains fewer blocks (last-block, lora)"


# --------------------------------------------------------------------------- several runs, and the command


def share_frozen_work(gpt_model: gpt.GPTModel, tokens: data.TokenizedSplits, num_classes: int, job: runner.Job
                      ) -> dict[str, dict[int, fastpath.PrefixCache]]:
    """Several runs (--compare, --seeds) start from the same frozen weights, so the frozen blocks
    compute the same for all of them: once here, for every frozen boundary the runs will ask for
    (nested: each deeper one from the one below); each run then takes its own from this shelf."""
    cfg = job.cfg
    strategies = [name for name in cfg.compare or [cfg.strategy] if name not in evaluation.BASELINES]  # GPT's
    runs = len(strategies) * len(cfg.seeds or [cfg.seed])
    if runs < 2 or not cfg.use_prefix_cache:
        return {}
    frozen = classify.GPTClassifier(gpt_model, num_classes, cfg.pooling).to(job.runtime.device)
    classify.apply_strategy(frozen, "head")
    lengths = fastpath.planned_prefix_lengths(frozen, strategies, cfg.epochs)
    with mixed_precision(job):
        job.frozen_work = fastpath.share_frozen_work(frozen, dict(tokens.items()), lengths, job.runtime.device,
                                                     job.progress)
    gpt_model.cpu()  # each run trains a copy of it (build_classifier), made where memory is largest
    job.log(job.frozen_work.describe())
    return job.frozen_work.caches


def fit_baseline(name: str, tokens: data.TokenizedSplits, splits: data.Splits, seed: int,
                 class_weights: torch.Tensor | None, job: runner.Job) -> RunResult:
    """A classifier without GPT-2 (--compare majority,bag-of-words), fitted on the same training
    texts and scored with the same metrics as a strategy: what fine-tuning is measured against
    (evaluation.py). Its history is one record, the whole fit; it needs no seed. Saved as a run
    (metrics.json, mistakes.tsv), without a classifier: classify.py could not load it."""
    job.detail(f"baseline {name}: {evaluation.BASELINES[name]}")
    fit = evaluation.run_baseline(name, tokens, splits.label_names, class_weights)
    reports, losses = fit.reports, fit.losses
    record = EpochRecord(1, f"{name} (no GPT-2)", losses["train"], reports["train"].accuracy, losses["validation"],
                         reports["validation"].accuracy)
    training = Training(fastpath.CacheStatus(False, reason="no GPT-2: a baseline"), {}, [record],
                        epoch_seconds=[fit.seconds], best_epoch=1, seconds=fit.seconds)
    result = RunResult(name, reports, losses, fit.parameters, training, seed, fit.test_predictions,
                       list(tokens.test.labels), fit.test_probabilities)
    job.log(report.describe_result(result, tokens, brief=True, seeded=bool(job.cfg.seeds)))
    job.save(None, result, tokens, splits)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: the flags become a TrainConfig, then `pipeline` runs inside the
    machinery the chapter never mentions (runner.py: checks, torchrun, the run folder,
    comparisons, every error as one line)."""
    return runner.main(argv, TrainConfig, pipeline)


if __name__ == "__main__":
    sys.exit(main())
