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

Machinery the chapter never mentions wraps the pipeline from outside (`run`): torchrun
(distributed.py), the run folder that appears only when complete (report.py), several strategies
and seeds side by side (comparison.py), downloads (hub.py).

    python train.py                                   # the book's experiment
    python train.py --data SMSSpamCollection --init random --epochs 1   # offline
    python train.py --compare head,last-block,all     # the strategies side by side
    python train.py --compare head,last-block --seeds 3   # ... each trained with 3 seeds: spread, significance
    torchrun --nproc_per_node=4 train.py              # the same experiment on 4 GPUs
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # torch warns at import when NumPy is missing; this project does not use NumPy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch
from torch import nn
from torch.nn import functional as F

import classify
import comparison
import data
import distributed
import fastpath
import gpt
import hub
import metrics
import report


@dataclass
class TrainConfig:
    """Everything one run depends on. The defaults are the book's experiment."""

    data: str | None = None  # None: download the SMS Spam Collection
    validation_data: str | None = None
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    balanced: bool = True  # the book undersamples ham to the 747 spam messages
    model: str = "gpt2-small"
    init: str = "pretrained"  # or "random": same architecture, random weights
    strategy: str = "last-block"
    pooling: str = "last"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    max_length: int | None = None  # None: the longest training text (at most the context length)
    seed: int = 123
    device: str = "auto"
    out: str | None = None  # None: runs/<timestamp>
    eval_every: int = 0  # 0: evaluate only at the end of each epoch
    plot: bool = False
    compare: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # training seeds (--seeds); empty: --seed alone
    reference: str | None = None  # the strategy the others are tested against; None: last-block, or the first
    cache_dir: str | None = None
    compile: bool = False
    use_prefix_cache: bool = True  # False (--no-cache): the frozen blocks run at every step


@dataclass
class Job:
    """What the pipeline needs besides the settings, handed in by the machinery around it: where
    to compute (distributed.Runtime), where to tell (rank 0 prints; the other processes under
    torchrun are quiet), and where a finished run is saved (rank 0's run folder)."""

    cfg: TrainConfig
    runtime: distributed.Runtime
    log: Callable[[str], None] = report.quiet
    save: Callable[[classify.GPTClassifier, report.RunResult, TokenizedSplits], None] = lambda *run: None
    frozen_work: fastpath.SharedPrefix | None = None  # done once for several runs (`share_frozen_work`)

    @property
    def eval_batch_size(self) -> int:
        return max(self.cfg.batch_size, 32)  # no gradients kept: larger batches cost little memory


# --------------------------------------------------------------------------- the pipeline


def pipeline(cfg: TrainConfig, job: Job) -> list[report.RunResult]:
    """The chapter's pipeline, in order: steps 1-3 once, then for each strategy and training seed
    (one of each without --compare and --seeds) steps 4-7, the evaluation, and the classifier
    saved for classify.py. Every run starts from the same texts and the same GPT-2."""
    splits = load_labelled_text(cfg)  # 1. texto rotulado
    tokens = tokenize(splits, cfg)  # 2. tokenização
    gpt_model = load_gpt(cfg, log=job.log)  # 3. processamento pelo GPT (its pretrained weights)
    job.log(report.describe_steps(cfg, splits, tokens, gpt_model, job.runtime))
    shelf = share_frozen_work(gpt_model, tokens, len(splits.label_names), job)  # several runs: frozen work once
    results = []
    for strategy, seed in itertools.product(cfg.compare or [cfg.strategy], cfg.seeds or [cfg.seed]):
        model = build_classifier(gpt_model, len(splits.label_names), cfg.pooling, seed)  # 4-5. representação, head
        freeze(model, strategy, seed, cfg)  # "Congelamento de Camadas": what trains
        job.log(report.describe_strategy(model, strategy, cfg.epochs, seed if cfg.seeds else None))
        parameters = report.parameter_counts(model)  # what trains from the start (gradual: then more)
        inputs = {name: fastpath.SplitInputs(dataset, shelf=shelf.get(name, {})) for name, dataset in tokens.items()}
        training = fine_tune(model, inputs, strategy, seed, job)  # 6-7. loss, atualização dos pesos
        restore_state(model, training.best_state)  # the weights of the best epoch
        reports, losses, predictions = evaluate_splits(model, inputs, splits.label_names, job)  # avaliação
        results.append(report.RunResult(strategy, reports, losses, parameters, training, seed, predictions["test"],
                                        list(tokens.test.labels)))
        job.log(report.describe_result(results[-1], tokens))
        job.save(model, results[-1], tokens)  # inferência: classify.py loads it
    return results


def load_labelled_text(cfg: TrainConfig) -> data.Splits:
    """Step 1, "Texto rotulado": texts with their classes, split into train / validation / test."""
    splits = data.load_splits(cfg.data, seed=cfg.seed, balanced=cfg.balanced, text_column=cfg.text_column,
                              label_column=cfg.label_column, validation_path=cfg.validation_data,
                              test_path=cfg.test_data, cache_dir=cfg.cache_dir, progress=hub.print_progress)
    if len({label for label in splits.train.labels}) < 2:
        raise ValueError("the training data has one class only; a classifier needs two or more")
    for name in ("train", "validation", "test"):
        if len(getattr(splits, name)) == 0:
            raise ValueError(f"the {name} split is empty: the data set is too small to split 70/10/20")
    return splits


@dataclass
class TokenizedSplits:
    """Step 2's output: token ids and labels of each split, all cut to `max_length` tokens."""

    train: data.ClassificationDataset
    validation: data.ClassificationDataset
    test: data.ClassificationDataset
    max_length: int

    def items(self) -> list[tuple[str, data.ClassificationDataset]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


def tokenize(splits: data.Splits, cfg: TrainConfig) -> TokenizedSplits:
    """Step 2, "Tokenização": GPT-2's BPE turns each text into token ids.

    Without --max-length the longest training text sets it (as in the book), but never beyond
    what the model reads; validation and test texts are cut to the same length.
    """
    tokenizer, longest = data.get_tokenizer("gpt2"), classify.longest_text(gpt.load_config(cfg.model), cfg.pooling)
    train = data.ClassificationDataset.from_texts(splits.train, tokenizer, cfg.max_length or longest)
    max_length = cfg.max_length or max(train.lengths)
    validation = data.ClassificationDataset.from_texts(splits.validation, tokenizer, max_length)
    test = data.ClassificationDataset.from_texts(splits.test, tokenizer, max_length)
    return TokenizedSplits(train, validation, test, max_length)


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


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Step 6, "Cálculo da loss supervisionada": cross-entropy, minus the log-probability the model
    gives each text's true class, averaged over the batch. logits (B, K), labels (B,)."""
    return F.cross_entropy(logits, labels)


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
              job: Job) -> report.Training:
    """Steps 6 and 7, epoch after epoch ("Treinamento Supervisionado"), each epoch then measured on
    the validation set. Keeps a copy of the weights of the epoch with the best validation
    accuracy (of equals, the lower loss, then the earlier epoch)."""
    cfg, device, log = job.cfg, job.runtime.device, job.log
    training_started = time.perf_counter()
    model.to(device)
    compile_blocks(model, cfg, device, log)
    optimizer = make_optimizer(model, cfg)
    network = distributed.wrap(model, job.runtime)  # torchrun: gradients exchanged between processes
    sampler = fastpath.BucketBatchSampler(inputs["train"].dataset.lengths, cfg.batch_size, seed)
    batches = distributed.shard(sampler, job.runtime)  # torchrun: this process's share of every batch
    # "Congelamento de Camadas": the frozen blocks give the same output every epoch, so each text
    # runs through them once, here, and training continues from their stored output.
    cache = fastpath.refresh_caches(model, inputs, device, cfg.use_prefix_cache)
    log(cache.describe())
    training = report.Training(cache=cache, best_state=trainable_state(model))
    progress = report.Progress(total_steps=cfg.epochs * len(batches), log_every=max(1, len(batches) // 10))
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        if strategy == "gradual" and epoch > 0 and unfreeze_next_block(model, optimizer, training, epoch):
            del network  # under torchrun the old DDP and its gradient hooks go first
            network = distributed.wrap(model, job.runtime)  # DDP must see the new trainable set
            training.set_cache(fastpath.refresh_caches(model, inputs, device, cfg.use_prefix_cache))
            log(f"epoch {epoch + 1}: unfrozen, now training {report.describe_trainable(model)}; "
                f"{training.cache.describe()}")
        trainable = report.describe_trainable(model)
        batches.set_epoch(epoch)  # a new batch order every epoch, the same for every run with this seed
        loss_sum = torch.zeros((), device=device)  # this process's texts, summed on the device: no sync per step
        correct, seen = torch.zeros((), dtype=torch.long, device=device), 0
        model.train()
        for step, batch in enumerate(inputs["train"].batches(batches, device), start=1):
            with fastpath.autocast(device):  # bfloat16 on CUDA
                logits = network(batch.inputs, batch.lengths, batch.start_block).float()  # steps 3-5: (B, K)
            loss = supervised_loss(logits, batch.labels)  # step 6
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # gradients reach the trainable parameters only
            optimizer.step()  # step 7: AdamW moves them against their gradient
            if len(batch.labels):  # a torchrun process's share may be empty (the mean of nothing is NaN)
                loss_sum += loss.detach() * len(batch.labels)
                correct += (logits.argmax(dim=-1) == batch.labels).sum()
            seen += batch.size  # the whole batch's texts, on every process
            progress.advance(batch.size)
            check_now = cfg.eval_every > 0 and progress.step % cfg.eval_every == 0
            if check_now or step % progress.log_every == 0 or step == len(batches):
                running_loss = finite(per_text(job, loss_sum, seen), "training")
                line = progress.line(epoch, cfg.epochs, step, len(batches), running_loss)
                if check_now:
                    check = evaluate(model, inputs["validation"], job)
                    model.train()
                    training.step_checks.append({"step": progress.step, "validation_loss": check.loss})
                    line += f"  validation loss {check.loss:.4f}"
                log(line)
        train_loss, train_accuracy = finite(per_text(job, loss_sum, seen), "training"), per_text(job, correct, seen)
        validation = evaluate(model, inputs["validation"], job)
        record = report.EpochRecord(epoch + 1, trainable, train_loss, train_accuracy,
                                    finite(validation.loss, "validation"), validation.accuracy)
        training.history.append(record)
        training.epoch_seconds.append(time.perf_counter() - started)
        best = max(training.history, key=lambda r: (r.validation_accuracy, -r.validation_loss))  # first of equals
        if best is record:
            training.best_epoch, training.best_state = record.epoch, trainable_state(model)
        log(report.epoch_line(record, cfg.epochs, training))
    training.seconds = time.perf_counter() - training_started
    return training


def per_text(job: Job, total: torch.Tensor, texts: int) -> float:
    """A sum over this process's texts, added up over every process (torchrun), per text."""
    return job.runtime.sum(total).item() / texts


def finite(loss: float, which: str) -> float:
    """`loss`; a loss that stopped being finite stops the run: no model of NaNs is saved as if it trained."""
    if not math.isfinite(loss):
        raise ValueError(f"the {which} loss became {loss}: training diverged (try a lower --lr, or --lora-alpha "
                         "for lora); no run folder was written")
    return loss


def unfreeze_next_block(model: classify.GPTClassifier, optimizer: torch.optim.Optimizer, training: report.Training,
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


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Loss and predictions over one whole split, in the split's order."""

    loss: float
    y_true: list[int]
    y_pred: list[int]

    @property
    def accuracy(self) -> float:
        return metrics.accuracy(self.y_true, self.y_pred)


@torch.no_grad()
def evaluate(model: classify.GPTClassifier, split: fastpath.SplitInputs, job: Job) -> Evaluation:
    """Mean loss and every prediction over a split, in batches ordered by length."""
    model.eval()
    device, loss_sum, predictions = job.runtime.device, 0.0, [0] * len(split.dataset)
    for indices in fastpath.BucketBatchSampler(split.dataset.lengths, job.eval_batch_size, seed=0, shuffle=False):
        batch = split.batch(indices, device)
        with fastpath.autocast(device):
            logits = model(batch.inputs, batch.lengths, batch.start_block).float()  # (B, K)
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        for i, prediction in zip(indices, logits.argmax(dim=-1).tolist()):
            predictions[i] = prediction
    return Evaluation(loss_sum / len(split.dataset), list(split.dataset.labels), predictions)


def evaluate_splits(model: classify.GPTClassifier, inputs: dict[str, fastpath.SplitInputs], label_names: list[str],
                    job: Job) -> tuple[dict[str, metrics.ClassificationReport], dict[str, float], dict[str, list[int]]]:
    """The chapter's metrics ("Avaliando classificadores de texto") on every split; also each
    split's predictions, text by text (to compare strategies on the same texts)."""
    fastpath.refresh_caches(model, inputs, job.runtime.device, job.cfg.use_prefix_cache)  # training's, if it can
    reports, losses, predictions = {}, {}, {}
    for name, split in inputs.items():
        evaluation = evaluate(model, split, job)
        reports[name] = metrics.classification_report(evaluation.y_true, evaluation.y_pred, label_names)
        losses[name], predictions[name] = evaluation.loss, evaluation.y_pred
    return reports, losses, predictions


# --------------------------------------------------------------------------- the machinery around the pipeline


def share_frozen_work(gpt_model: gpt.GPTModel, tokens: TokenizedSplits, num_classes: int, job: Job
                      ) -> dict[str, dict[int, fastpath.PrefixCache]]:
    """Several runs (--compare, --seeds) start from the same frozen weights, so the frozen blocks
    compute the same for all of them: once here, for every frozen boundary the runs will ask for
    (nested: each deeper one from the one below); each run then takes its own from this shelf."""
    cfg = job.cfg
    runs = len(cfg.compare or [cfg.strategy]) * len(cfg.seeds or [cfg.seed])
    if runs < 2 or not cfg.use_prefix_cache:
        return {}
    frozen = classify.GPTClassifier(gpt_model, num_classes, cfg.pooling).to(job.runtime.device)
    classify.apply_strategy(frozen, "head")
    lengths = fastpath.planned_prefix_lengths(frozen, cfg.compare or [cfg.strategy], cfg.epochs)
    job.frozen_work = fastpath.share_frozen_work(frozen, dict(tokens.items()), lengths, job.runtime.device)
    job.log(job.frozen_work.describe())
    return job.frozen_work.caches


def fetch_files(cfg: TrainConfig) -> None:
    """Download what the pipeline will read, once, into the cache: the SMS Spam Collection (no
    --data) and a preset's weights (--init pretrained)."""
    if cfg.data is None:
        hub.download_sms_spam(cfg.cache_dir, hub.print_progress)
    if cfg.init == "pretrained":
        hub.fetch(cfg.model, cfg.cache_dir, hub.print_progress)


def run(cfg: TrainConfig, argv: list[str], log: Callable[[str], None]) -> int:
    """The main job: the pipeline, inside the machinery. The arguments are checked before any
    work; under torchrun the processes join (distributed.session) and rank 0 downloads first
    while the others wait; the run folder is built aside and appears only when complete
    (report.staged_output); several runs add compare.json and the comparison table."""
    started = time.perf_counter()
    gpt_config = check_config(cfg)
    comparing = bool(cfg.compare) or len(cfg.seeds) > 1  # one folder per run, compare.json beside them
    with distributed.session(cfg.device) as runtime:
        job = Job(cfg, runtime, log if runtime.is_main_process else report.quiet)
        out = Path(cfg.out) if cfg.out else report.default_out_dir()
        with report.staged_output(out, runtime) as staging:  # None on every process but rank 0
            distributed.load_in_turn(runtime, lambda: fetch_files(cfg))

            def save(model: classify.GPTClassifier, result: report.RunResult, tokens: TokenizedSplits) -> None:
                folder = report.run_folder(result.strategy, result.seed, comparing, several_seeds=len(cfg.seeds) > 1)
                (staging / folder).mkdir(parents=True, exist_ok=True)
                classify.save_classifier(model.cpu(), staging / folder, result.reports["train"].label_names,
                                         tokens.max_length)
                facts = report.RunFacts(cfg, argv, tokens, gpt_config, runtime, started)
                report.write_run(staging / folder, out / folder, result, facts, job.log)

            if staging is not None:  # rank 0 writes the classifier (for classify.py), metrics.json, plots
                job.save = save
            results = pipeline(cfg, job)
            if comparing and staging is not None:
                strategies = cfg.compare or [cfg.strategy]
                experiment = comparison.Experiment(strategies, cfg.seeds or [cfg.seed],
                                                   comparison.reference_strategy(cfg.reference, strategies),
                                                   results[0].test_labels, job.frozen_work,
                                                   time.perf_counter() - started)
                job.log(comparison.write_comparison(staging, out, results, experiment, cfg, argv))
        job.log(f"\ntotal time {time.perf_counter() - started:.1f} s; written to {out}")
    return 0


# --------------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune GPT-2 for text classification (chapter 06 of 'Fazendo um LLM do Zero'). With no "
        "arguments: the book's experiment (pretrained gpt2-small, SMS spam, last block, 5 epochs).")
    defaults = TrainConfig()
    group = parser.add_argument_group("1. labelled text")
    group.add_argument("--data", metavar="PATH", help="training data: a file in the SMS Spam Collection's format "
                       "(label<TAB>text), or a CSV/TSV with a header. Default: download the SMS Spam Collection "
                       "once (then cached)")
    group.add_argument("--validation-data", metavar="PATH",
                       help="a separate validation file (with --test-data); default: split --data 70/10/20")
    group.add_argument("--test-data", metavar="PATH", help="a separate test file (with --validation-data)")
    group.add_argument("--text-column", default=defaults.text_column, metavar="NAME",
                       help="CSV/TSV column holding the text (default: %(default)s)")
    group.add_argument("--label-column", default=defaults.label_column, metavar="NAME",
                       help="CSV/TSV column holding the class (default: %(default)s)")
    group.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=defaults.balanced,
                       help="undersample every class to the smallest one, as the book does (SMS: 1,045/149/300; "
                       "the default); --no-balanced keeps all the data and splits it stratified")
    group = parser.add_argument_group("2. tokenization")
    group.add_argument("--max-length", type=int, metavar="TOKENS", help="cut texts to this many tokens; default: "
                       "the longest training text, at most the model's context length")
    group = parser.add_argument_group("3. GPT")
    group.add_argument("--model", default=defaults.model, metavar="NAME_OR_PATH", help=f"a preset "
                       f"({', '.join(gpt.PRESETS)}), a Hugging Face folder or a .safetensors file "
                       "(default: %(default)s)")
    group.add_argument("--init", default=defaults.init, choices=("pretrained", "random"),
                       help="'random': the same architecture with random weights (what does pretraining buy? "
                       "also runs offline; default: %(default)s)")
    group.add_argument("--cache-dir", metavar="DIR", help="where downloads are kept "
                       "(default: $GPT2_CLASSIFICATION_CACHE or ~/.cache/gpt2-classification)")
    group = parser.add_argument_group("4-5. representation and classification head")
    group.add_argument("--pooling", default=defaults.pooling, metavar="{" + ",".join(classify.POOLINGS) + "}",
                       help="which vector represents the text: 'last' real token, the only one that has seen the "
                       "whole text; 'mean' of the tokens; 'special', an <|endoftext|> appended to each text; "
                       "'first', for contrast (default: %(default)s)")
    group.add_argument("--strategy", default=defaults.strategy, metavar="NAME", help="what is trained: head, "
                       "last-block, last-N-blocks (e.g. last-2-blocks), all, gradual (one more block unfrozen per "
                       "epoch), lora (default: %(default)s)")
    group.add_argument("--lora-rank", type=int, default=defaults.lora_rank, metavar="R",
                       help="rank of the LoRA adapters (default: %(default)s)")
    group.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, metavar="ALPHA",
                       help="the LoRA update is scaled by alpha / rank (default: %(default)s)")
    group = parser.add_argument_group("6-7. supervised loss and weight update")
    group.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N",
                       help="passes over the training data (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                       help="texts per weight update (default: %(default)s)")
    group.add_argument("--lr", type=float, default=defaults.lr, metavar="RATE",
                       help="AdamW learning rate (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, metavar="W",
                       help="AdamW weight decay (default: %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, metavar="N",
                       help="one seed for the split, the new weights, the batch order and (with --init random) "
                       "the random GPT (default: %(default)s)")
    group.add_argument("--eval-every", type=int, default=defaults.eval_every, metavar="STEPS",
                       help="also print the validation loss every this many steps (default 0: only after each epoch)")
    group = parser.add_argument_group("running and output")
    group.add_argument("--device", default=defaults.device, metavar="NAME",
                       help="auto (the default: cuda, then mps, then cpu), cuda, mps or cpu")
    group.add_argument("--out", metavar="DIR", help="where the run is written (classifier.safetensors, "
                       "config.json, metrics.json); default: runs/<timestamp>")
    group.add_argument("--plot", action="store_true",
                       help="also write loss/accuracy curves and confusion matrices as PNG (needs matplotlib)")
    group.add_argument("--compare", default="", metavar="STRATEGY,STRATEGY,...", help="train each listed strategy "
                       "from the same starting weights and data, then print one table (e.g. head,last-block,all); "
                       "the frozen blocks' work is done once for all of them")
    group.add_argument("--seeds", default="1", metavar="N|SEED,SEED,...", help="train each strategy N times, with "
                       "the training seeds --seed, --seed+1, ... (or with the seeds listed; '7,' is a list of one), "
                       "and report mean, std, min and max. A training seed sets the new head's initial weights, the "
                       "batch order and LoRA's initial adapters; the split and, with --init random, the random GPT "
                       "stay fixed by --seed, so the spread is the training's alone (default: 1, as today)")
    group.add_argument("--reference", metavar="STRATEGY", help="with --compare: test every strategy against this "
                       "one, text by text on the test set (McNemar's exact test, per seed pair); default: last-block "
                       "when compared, else the first strategy")
    group.add_argument("--compile", action="store_true", help="torch.compile the blocks (CUDA only)")
    group.add_argument("--no-cache", dest="use_prefix_cache", action="store_false",
                       help="do not cache the frozen blocks' outputs (slower, same result: for comparison)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values["compare"] = [name.strip() for name in args.compare.split(",") if name.strip()]
    values["seeds"] = comparison.parse_seeds(args.seeds, args.seed)
    return TrainConfig(**values)


def check_config(cfg: TrainConfig) -> gpt.GPTConfig:
    """Reject bad arguments before anything is downloaded or trained; returns the model's shape."""
    gpt_config = gpt.load_config(cfg.model)  # ValueError on an unknown name or bad path
    if gpt_config.vocab_size <= data.END_OF_TEXT_ID:
        raise ValueError(f"--model {cfg.model}: {gpt_config.vocab_size} tokens, fewer than GPT-2's tokenizer needs "
                         f"({data.END_OF_TEXT_ID + 1})")
    for name in cfg.compare or [cfg.strategy]:
        classify.trainable_blocks(name, gpt_config.n_layers)  # ValueError: unknown, or more blocks than the model has
    if len(set(cfg.compare)) < len(cfg.compare):
        raise ValueError(f"--compare {','.join(cfg.compare)}: a strategy is listed twice (use --seeds to repeat one)")
    if cfg.reference is not None and cfg.reference not in (cfg.compare or [cfg.strategy]):
        raise ValueError(f"--reference {cfg.reference}: not among the strategies compared "
                         f"({', '.join(cfg.compare or [cfg.strategy])})")
    width = gpt_config.emb_dim
    parameters = (gpt_config.vocab_size + gpt_config.context_length) * width + gpt_config.n_layers * 12 * width**2
    if cfg.init == "random" and parameters * 4 > distributed.memory_bytes():  # before building what cannot fit
        raise ValueError(f"--model {cfg.model}: about {parameters:,} parameters, {parameters * 4 / 2**30:,.0f} GiB "
                         f"in float32, more than this machine's {distributed.memory_bytes() / 2**30:,.0f} GiB")
    if cfg.pooling not in classify.POOLINGS:
        raise ValueError(f"unknown pooling {cfg.pooling!r}; choose one of {', '.join(classify.POOLINGS)}")
    lora = "lora" in (cfg.compare or [cfg.strategy])
    for flag, value, ok, requirement in (
        ("--epochs", cfg.epochs, cfg.epochs >= 1, "at least 1"),
        ("--batch-size", cfg.batch_size, cfg.batch_size >= 1, "at least 1"),
        ("--eval-every", cfg.eval_every, cfg.eval_every >= 0, "0 or more"),
        ("--lr", cfg.lr, 0 < cfg.lr < math.inf, "a finite number greater than 0"),
        ("--weight-decay", cfg.weight_decay, 0 <= cfg.weight_decay < math.inf, "a finite number, 0 or more"),
        ("--lora-rank", cfg.lora_rank, not lora or 1 <= cfg.lora_rank <= gpt_config.emb_dim,
         f"between 1 and the model's width, {gpt_config.emb_dim}"),
        ("--lora-alpha", cfg.lora_alpha, not lora or math.isfinite(cfg.lora_alpha), "a finite number"),
        ("--seed", cfg.seed, 0 <= cfg.seed < 2**63, "in 0..2**63-1"),
    ):
        if not ok:
            raise ValueError(f"{flag} {value}: must be {requirement}")
    if (cfg.validation_data is None) != (cfg.test_data is None):
        raise ValueError("give both --validation-data and --test-data, or neither (to split --data 70/10/20)")
    for flag, path in (("--data", cfg.data), ("--validation-data", cfg.validation_data),
                       ("--test-data", cfg.test_data)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    longest = classify.longest_text(gpt_config, cfg.pooling)
    if cfg.max_length is not None and not 1 <= cfg.max_length <= longest:
        raise ValueError(f"--max-length {cfg.max_length}: must be between 1 and {longest}, what the model reads "
                         f"(its context length{', less the special token' if cfg.pooling == 'special' else ''})")
    if cfg.init == "pretrained" and Path(cfg.model).is_dir() and not (Path(cfg.model) / "model.safetensors").is_file():
        raise ValueError(f"--model {cfg.model}: no model.safetensors there (for its architecture alone: --init random)")
    distributed.pick_device(cfg.device)  # ValueError: unknown or absent
    return gpt_config


def stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


OFFLINE_HINT = ("offline, use local files: --data PATH (the SMS Spam Collection file or your CSV), --model PATH "
                "(a Hugging Face folder or a .safetensors file), or --init random (no weights needed)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    label = distributed.process_label()  # '[rank 1] ' under torchrun: every process reports its own failure
    if hasattr(sys.stdout, "reconfigure"):  # class names a terminal cannot show: escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    previous_handler = signal.signal(signal.SIGTERM, stop_like_ctrl_c)  # kill, docker stop, a scheduler
    try:
        return run(config_from_args(args), argv, report.print_line)
    except BrokenPipeError:  # the output went to a pipe that closed (`| head`): stop quietly
        return 1
    except ConnectionError as error:
        print(f"{label}error: {report.one_line(error)}; {OFFLINE_HINT}", file=sys.stderr)
    except (ValueError, OSError) as error:
        print(f"{label}error: {report.one_line(error)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{label}interrupted: no run folder was written", file=sys.stderr)
        return 130
    except (distributed.OtherProcessFailed, distributed.StoppedByTorchrun) as error:
        if label == "[rank 0] ":  # another process failed and said why; rank 0 says that this one stopped
            print(f"{label}{report.one_line(error)}", file=sys.stderr)
    except Exception as error:
        if isinstance(error, MemoryError) or "out of memory" in str(error) or "can't allocate memory" in str(error):
            print(f"{label}error: out of memory (try a smaller --batch-size, --max-length or --model); "
                  "no run folder was written", file=sys.stderr)  # torch's allocator raises a RuntimeError
            return 2
        if label:  # a bug on one process: name it, then the traceback
            print(f"{label}error: {type(error).__name__}: {report.one_line(error)}", file=sys.stderr, flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 2


if __name__ == "__main__":
    sys.exit(main())
