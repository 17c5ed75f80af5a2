"""The ``gptpipe`` command line. Each command checks its input, then runs the matching Prefect flow
in-process, on the Prefect server set by PREFECT_API_URL or else on this machine's local one
(``flows.local_server``, started by the first command that needs it)."""

from __future__ import annotations

import atexit
import contextvars
import gc
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the CLI shows its own progress

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows import local_server
from storage.store import StoreError, check_name, default_store_url, redact

# At exit, the garbage collector's last passes over every object torch, Prefect and the flows made take
# 1.2 s of a collect's 10 s fixed cost; the memory goes back to the system either way. Registered before
# the handler that flushes Prefect's logs, so it runs after it.
atexit.register(gc.freeze)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="G.pt as a pipeline: collect checkpoints, train G.pt, prompt it.")
store_app = typer.Typer(no_args_is_help=True, help="Object storage for development.")
app.add_typer(store_app, name="store")
console = Console(stderr=True)


@app.callback()
def _exit_cleanly_on_sigterm() -> None:
    """``kill``, a scheduler's timeout or a container stop send SIGTERM, which by default ends Python
    without running ``atexit``: Prefect's logs would not be flushed. Turned into a normal exit; an
    interrupted sweep resumes as after any crash."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextmanager
def prefect_server():
    """Find or start the local Prefect server (``flows.local_server``) in a thread, and give the wait
    for it, to call before the first flow: a start-up, seconds of its own process, runs while the
    command imports torch, checks its input and imports its flow. Input that fails a check in the block
    abandons the server: the command neither waits for it nor holds it, and one started for it retires
    at once (also where the command's process ends first)."""
    # Prefect's settings first, on this thread: imported by the starting thread instead, the 2 s of
    # Python contend for the interpreter with torch's import, and the server's process starts 1.2 s later
    import prefect.settings  # noqa: F401

    found: list = []
    abandoned = threading.Event()

    def start():
        try:
            found.append(local_server.connect(abandoned))
        except BaseException as e:  # handed to the main thread by ready()
            found.append(e)

    # in the caller's context: Prefect's settings (an API set by ``temporary_settings``, as a Python caller
    # or a test does) live in context variables, which a new thread would not see
    thread = threading.Thread(target=contextvars.copy_context().run, args=(start,), name="prefect-server-start", daemon=True)
    thread.start()

    def ready() -> None:
        thread.join()
        if isinstance(found[0], BaseException):
            raise found[0]
        if found[0] is None:  # an API is configured
            return
        url, started = found[0]
        if started:
            console.print(f"Prefect server for this machine's commands: {url} (it exits after "
                          f"{local_server.idle_s():.0f} s unused)", soft_wrap=True)
        # Task processes (the process runner, a local Dask cluster) inherit the environment, and this
        # process's clients read it once more now
        os.environ["PREFECT_API_URL"] = url
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()

    try:
        yield ready
    except BaseException:
        abandoned.set()
        raise


StoreOpt = typer.Option(None, "--store", help="Store URL (local folder, s3://bucket/prefix). Default: $GPTPIPE_STORE or ~/.gptpipe/store")


def check_guidance(guidance: float | None, prompt_dropout: float | None, model: str | None = None) -> None:
    """``--guidance``: a scale in (0, 20], other than 1 only for a model trained with prompt dropout."""
    if guidance is None:
        return
    if not 0 < guidance <= 20:
        raise StoreError(f"--guidance must be a scale between 0 and 20 (1 = none), got {guidance}")
    if guidance != 1.0 and not prompt_dropout:
        raise StoreError("--guidance needs a model trained with --prompt-dropout" +
                         (f"; {model} was trained without" if model else " (e.g. 0.1)"))


def check_temperature(temperature: float | None, sampler: str = "ddim") -> None:
    """``--temperature``: a scale of the starting noise in (0, 2], for the samplers that start from noise."""
    if temperature is None:
        return
    if not 0 < temperature <= 2:
        raise StoreError(f"--temperature must be a scale between 0 and 2 (1 = the model's own noise), got {temperature}")
    if temperature != 1.0 and sampler == "mean":
        raise StoreError("--temperature scales the starting noise of the ddim and ddpm samplers, not of 'mean'")


def given(**options) -> dict:
    """The options the user set: the rest are left to the config's own defaults (defined once, there)."""
    return {k: v for k, v in options.items() if v is not None}


# The errors a user's input can cause, by the module that defines them. Only modules already imported
# can have raised one, so a failing command does not import torch (seconds) just to recognise its error.
USER_ERRORS = {"storage.store": "StoreError", "gptpipe.data": "DataError", "gptpipe.gpt.trainer": "DeviceError",
               "gptpipe.problems": "ProblemError", "gptpipe.sweep.config": "SweepConfigError",
               "storage.s3server": "S3ServerError"}


def _user_errors() -> tuple[type[Exception], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)


@contextmanager
def user_errors():
    """Bad input: one line on stderr, exit status 2, no traceback."""
    try:
        yield
    except _user_errors() as e:
        typer.echo(f"error: {redact(str(e)).splitlines()[0]}", err=True)
        raise typer.Exit(2)


@contextmanager
def progress_bar(description: str, total: int, poll, every: float = 0.5):
    """A rich progress bar fed by ``poll()`` (e.g. committed shards in the store) from a thread, so the
    flow itself needs to know nothing about terminals."""
    with progress_bars([(description, total, poll)], every):
        yield


@contextmanager
def progress_bars(bars: list[tuple[str, int, object]], every: float = 0.5):
    """``progress_bar`` for several ``(description, total, poll)`` at once, e.g. a pipeline's stages."""
    stop = threading.Event()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal and "GPTPIPE_PROGRESS" not in os.environ) as bar:
        tasks = [(bar.add_task(description, total=total), poll) for description, total, poll in bars]

        def update():
            for tid, poll in tasks:
                try:
                    bar.update(tid, completed=poll())
                except Exception:
                    pass

        def watch():
            while not stop.wait(every):
                update()

        # no terminal to draw on: no polling of the store while the work runs
        thread = threading.Thread(target=watch, daemon=True) if not bar.disable else None
        if thread is not None:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join()
                update()


def store_poll(url: str, count: Callable) -> Callable[[], int]:
    """A progress bar's poll: ``count(store)`` for the store at ``url``, 0 while it does not exist yet."""
    from storage.store import open_store

    def poll() -> int:
        try:
            return count(open_store(url))
        except StoreError:
            return 0
    return poll


@app.command()
def collect(
    sweep: str = typer.Option(..., help="Sweep name (letters, digits, . _ -)"),
    problem: str = typer.Option(..., help="digits_mlp, mnist_mlp, cifar_cnn or cartpole"),
    runs: int = typer.Option(..., help="Number of training runs"),
    store: Optional[str] = StoreOpt,
    data: Optional[str] = typer.Option(None, help="Data source (default: the problem's embedded one)"),
    data_root: Optional[str] = typer.Option(None, help="Folder with torchvision data sets (mnist, fashion_mnist)"),
    shard_size: Optional[int] = typer.Option(None, help="Runs per shard = per task, trained as one batched computation (default: SweepConfig's)"),
    epochs: Optional[int] = typer.Option(None, help="Epochs (PPO iterations for cartpole); default: the problem's recipe"),
    checkpoints: Optional[int] = typer.Option(None, help="Checkpoints per run (init, iterations, final; default: SweepConfig's)"),
    seed: Optional[int] = typer.Option(None, help="Sweep seed (default: SweepConfig's)"),
    lr_min: Optional[float] = typer.Option(None, help="Learning rates are log-uniform in [lr-min, lr-max]; default: the problem's recipe"),
    lr_max: Optional[float] = typer.Option(None),
    data_order: Optional[str] = typer.Option(None, help="per_run (each run its own shuffle; the default) or shared (one shuffle per epoch for the sweep: 2.4x faster for MLPs)"),
    checkpoint_spacing: Optional[str] = typer.Option(None, help="linear in steps (the default), or log (dense early, where the metrics move most)"),
    runner: str = typer.Option("thread", help="thread, process or dask"),
    workers: Optional[int] = typer.Option(None, help="Concurrent shard tasks (default: one per core)"),
    dask_address: Optional[str] = typer.Option(None, help="tcp://host:port of a dask.distributed scheduler"),
):
    """Train a sweep of small networks and store every checkpoint. Re-running resumes."""
    from flows.runners import RUNNERS, task_runner, torch_threads_per_task

    url = store or default_store_url()
    with user_errors():
        if runner not in RUNNERS:
            raise StoreError(f"unknown runner {runner!r} (choose from {', '.join(RUNNERS)})")
        if workers is not None and workers < 1:
            raise StoreError(f"--workers must be at least 1, got {workers}")
        check_name(sweep)
        # the server starts while torch loads and the sweep is checked: a no-op collect that starts it took 13-16 s, now 11-13
        with prefect_server() as server_ready:
            from gptpipe.stages import collect as collect_stage
            from gptpipe.sweep.config import SweepConfig
            from storage import sweeps

            recipe = given(data=data, epochs=epochs, checkpoints=checkpoints, shard_size=shard_size, seed=seed, lr_min=lr_min,
                           lr_max=lr_max, data_order=data_order, checkpoint_spacing=checkpoint_spacing)
            config = SweepConfig(problem=problem, runs=runs, **recipe)
            collect_stage.check(url, sweep, config, data_root)
            from flows.collect import collect_flow
            from gptpipe.evaluation.report import plt_module

            plt_module()  # the sweep's summary plot needs it at the end; now it loads while the server starts
            workers = workers or (os.cpu_count() or 1)
            flow = collect_flow.with_options(task_runner=task_runner(runner, workers, dask_address))
            server_ready()
            with progress_bar(f"collect {sweep}", config.n_shards, store_poll(url, lambda st: len(sweeps.committed_shards(st, sweep)))):
                summary = flow(store=url, sweep=sweep, problem=problem, runs=runs, data_root=data_root,
                               torch_threads=torch_threads_per_task(workers), **recipe)
    _echo_summary(f"sweep {sweep} in {url}", summary)


@app.command()
def catalog(
    sql: str = typer.Argument(..., help="SQL over tables checkpoints, runs, evaluations"),
    store: Optional[str] = StoreOpt,
    format: str = typer.Option("table", "--format", help="table, csv or json"),
):
    """Query the metric catalog with SQL (DuckDB)."""
    from storage import catalog as cat
    from storage.store import open_store

    with user_errors():
        if format not in ("table", "csv", "json"):
            raise StoreError(f"unknown format {format!r} (table, csv or json)")
        result = cat.query(open_store(store or default_store_url()), sql)
    _print_table(result, format)


def _print_table(result, format: str) -> None:
    import json

    rows = result.to_pylist()
    if format == "json":
        typer.echo(json.dumps(rows, default=str))
    elif format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(result.column_names)
        writer.writerows([[r[c] for c in result.column_names] for r in rows])
    else:
        from rich.table import Table

        table = Table(*result.column_names)
        for r in rows:
            table.add_row(*[f"{v:.6g}" if isinstance(v, float) else str(v) for v in r.values()])
        Console().print(table)


@app.command()
def train(
    sweep: list[str] = typer.Option(..., help="Sweep(s) to learn from (repeat --sweep for several)"),
    model: str = typer.Option(..., help="Model name"),
    store: Optional[str] = StoreOpt,
    preset: Optional[str] = typer.Option(None, help="tiny (CPU demo; the default), small or paper"),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the preset's)"),
    metric: Optional[str] = typer.Option(None, help="Metric to condition on (default: the problem's, test_loss)"),
    batch_size: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present; the default), cpu, cuda"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: the preset's)"),
    force: bool = typer.Option(False, "--force", help="Train a GPU-sized preset (paper) even where no GPU is visible"),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model first (a minute or more; "
                                       "then faster steps: see the README's figures)"),
    pairing: Optional[str] = typer.Option(None, help="Training pairs: uniform (the paper), init, mixed (the default), "
                                          "two-way (mixed, a quarter reversed: targets worse than the start), stay (mixed, a tenth "
                                          "with the start itself as target)"),
    save_every: Optional[int] = typer.Option(None, help="Save (and resume from) every N steps (default: the train stage's)"),
    memory_budget: Optional[float] = typer.Option(None, help="Bytes of training parameters read into memory; bigger "
                                                  "training sets are streamed from the store (default 2 GiB, $GPTPIPE_MEMORY_BUDGET)"),
    prompt_dropout: Optional[float] = typer.Option(None, help="Fraction of training pairs shown without their target "
                                                   "metric, so the model can be sampled with --guidance (default 0)"),
    temperature: Optional[float] = typer.Option(None, help="Scale of the starting noise the model is sampled with by "
                                                "default (1 = the model's own noise; below 1 samples keep closer to the most "
                                                "likely answer)"),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale the model is sampled with by "
                                             "default (1 = none; above 1 needs --prompt-dropout)"),
    seed: Optional[int] = typer.Option(None, help="Training seed: G.pt's init, its pairs and noise, and which runs are "
                                       "held out (default 0); another seed measures how much one training differs from the next"),
    candidates: int = typer.Option(1, help="Train this many G.pts (seeds seed, seed + 1, ...) and keep the best by "
                                   "validation (--choose-by) as --model"),
    choose_by: str = typer.Option("one-update", help="With --candidates, how they are scored: one-update (one update from "
                                  "validation inits at the best prompt, scored on the training split) or alignment (prompt "
                                  "alignment R² of validation inits over a range of prompts)"),
    validation_inits: Optional[int] = typer.Option(None, help="With --candidates: fresh inits each candidate is scored on "
                                                   "(default 128 for one-update, 1,024 for alignment; fewer is faster and noisier)"),
    calibration_networks: Optional[int] = typer.Option(None, help="With --choose-by alignment: fresh inits each "
                                                       "candidate's calibration is fitted on (default 64, as an evaluation's; "
                                                       "fewer is faster and noisier)"),
    data_root: Optional[str] = typer.Option(None, help="With --candidates: folder with the sweep's torchvision data "
                                            "(mnist, fashion_mnist, cifar10), which the candidates are scored on"),
):
    """Train G.pt on sweeps in the store. Re-running the same command resumes. Under
    `torchrun --nproc_per_node N` every process trains one share of each batch (docs/multi-gpu.md)."""
    from storage import sweeps as sweeps_mod
    from storage.store import open_store

    url = store or default_store_url()
    with user_errors():
        check_name(model, "model")
        check_train_options(preset, steps, lr, pairing, save_every, memory_budget, prompt_dropout, guidance, device, force)
        check_temperature(temperature)
        st = open_store(url)
        for s in sweep:  # unknown or empty sweeps: one clear line now, not a failed flow run later
            sweeps_mod.read_config(st, s)
            sweeps_mod.committed_runs(st, s)
        check_candidates(st, sweep[0], candidates, choose_by, validation_inits, data_root, calibration_networks)
        budget = int(memory_budget) if memory_budget is not None else None
        options = given(preset=preset, steps=steps, device=device, batch_size=batch_size, lr=lr, pairing=pairing,
                        compile=compile_model or None, prompt_dropout=prompt_dropout, guidance=guidance,
                        temperature=temperature, seed=seed)
        from gptpipe.gpt import distributed

        if distributed.env_world_size() > 1:  # started by torchrun: every rank trains, rank 0 writes
            return _train_under_torchrun(url, list(sweep), model, metric, options, save_every, budget, candidates)
        with prefect_server() as server_ready:  # not above: a torchrun rank uses no server
            from flows.train import train_flow

            target = steps or _preset_steps(preset)
            server_ready()
            with progress_bar(f"train {model}", target * candidates, lambda: trained_steps(st, model, candidates)):
                summary = train_flow(store=url, sweeps=list(sweep), model=model, metric=metric, memory_budget=budget,
                                     candidates=candidates, choose_by=choose_by,
                                     **given(save_every=save_every, data_root=data_root, validation_inits=validation_inits,
                                           calibration_networks=calibration_networks), **options)
    _echo_summary(f"model {model} in {url}/models/{model}", summary)


def _train_under_torchrun(url: str, sweeps: list[str], model: str, metric: str | None, options: dict,
                          save_every: int | None, memory_budget: int | None, candidates: int) -> None:
    from gptpipe.stages.train import train_distributed

    if candidates > 1:
        raise StoreError("--candidates trains one G.pt after another: run it without torchrun")
    summary = train_distributed(store=url, sweeps=sweeps, model=model, metric=metric, options=options,
                                save_every=save_every, memory_budget=memory_budget)
    if int(os.environ.get("RANK", "0")) == 0:
        _echo_summary(f"model {model} in {url}/models/{model}", summary)


def check_candidates(st, sweep: str, candidates: int, choose_by: str, validation_inits: int | None,
                     data_root: str | None, calibration_networks: int | None = None) -> None:
    """``--candidates``, ``--choose-by``, ``--validation-inits`` and ``--calibration-networks``, and the data the
    candidates are scored on once trained: one line now."""
    from gptpipe.stages.candidates import check_choose_by, sweep_data

    if candidates < 1:
        raise StoreError(f"--candidates must be at least 1, got {candidates}")
    check_choose_by(choose_by)
    if validation_inits is not None and validation_inits < 2:
        raise StoreError(f"--validation-inits must be at least 2, got {validation_inits}")
    if calibration_networks is not None and calibration_networks < 2:
        raise StoreError(f"--calibration-networks must be at least 2, got {calibration_networks}")
    if candidates > 1:
        sweep_data(st, sweep, data_root)


def trained_steps(st, model: str, candidates: int) -> int:
    """Steps saved so far of ``model``, or of all its candidates together."""
    from gptpipe.stages.candidates import candidate_name
    from storage import models

    if candidates == 1:
        return models.step(st, model)
    return sum(models.step(st, candidate_name(model, k)) for k in range(candidates))


GPU_PRESETS = ("paper",)  # ~392M parameters at mnist_mlp size: refused on the CPU unless --force


def check_train_options(preset, steps, lr, pairing, save_every, memory_budget, prompt_dropout, guidance, device, force) -> None:
    """``gptpipe train``'s settings, each refused with one line before anything is read or written."""
    from gptpipe.gpt.model import PRESETS
    from gptpipe.gpt.trainer import PAIRINGS, resolve_device

    if preset is not None and preset not in PRESETS:
        raise StoreError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if save_every is not None and save_every <= 0:
        raise StoreError(f"--save-every must be positive, got {save_every}")
    if memory_budget is not None and not (memory_budget >= 0 and math.isfinite(memory_budget)):
        raise StoreError(f"--memory-budget must be a number of bytes, got {memory_budget}")
    if steps is not None and steps <= 0:
        raise StoreError(f"--steps must be positive, got {steps}")
    if lr is not None and not (0 < lr < 1):
        raise StoreError(f"--lr must be between 0 and 1, got {lr}")
    if prompt_dropout is not None and not (0 <= prompt_dropout < 1):
        raise StoreError(f"--prompt-dropout must be in [0, 1), got {prompt_dropout}")
    check_guidance(guidance, prompt_dropout)
    if pairing is not None and pairing not in PAIRINGS:
        raise StoreError(f"unknown --pairing {pairing!r} (choose from {', '.join(PAIRINGS)})")
    if resolve_device(device or "auto").type == "cpu" and preset in GPU_PRESETS and not force:
        raise StoreError(f"the {preset} preset is sized for a GPU and would train for days on this CPU (no CUDA device "
                         f"visible); use --preset tiny or small, or add --force")


def _preset_steps(preset: str | None) -> int:
    from gptpipe.gpt.trainer import TrainConfig

    return TrainConfig.for_preset(**given(preset=preset)).steps


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, help="Model to evaluate (default: the newest in the store)"),
    store: Optional[str] = StoreOpt,
    eval: Optional[str] = typer.Option(None, "--eval", help="Evaluation name (default: <model>-<timestamp>)"),
    networks: Optional[int] = typer.Option(None, help="Start networks: half held-out runs' inits, half fresh inits (default: EvalRequest's)"),
    prompts: Optional[int] = typer.Option(None, help="Prompts per network, from the sweep's best value to 0.9 x start (default: EvalRequest's)"),
    recursive: Optional[int] = typer.Option(None, help="G.pt updates in the recursive-prompting protocol (default: EvalRequest's)"),
    sampler: Optional[str] = typer.Option(None, help="Sampler (default: the model's)"),
    sample_steps: Optional[int] = typer.Option(None, help="Sampler steps (default: the model's)"),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the model's; "
                                             "other than 1 needs a model trained with --prompt-dropout)"),
    temperature: Optional[float] = typer.Option(None, help="Scale of the sampler's starting noise (default: the model's; "
                                                "a calibration of its own is fitted for another)"),
    seed: Optional[int] = typer.Option(None, help="Seed of fresh inits and sampling (default: EvalRequest's)"),
    data_root: Optional[str] = typer.Option(None, help="Folder with the sweep's torchvision data (mnist, fashion_mnist, cifar10)"),
    device: Optional[str] = typer.Option(None, help="Where G.pt samples: auto (CUDA when present; the default), cpu, cuda"),
    calibration: bool = typer.Option(True, help="Prompt through the model's calibration (fitted and saved on first use); "
                                                "--no-calibration: with the requests themselves"),
    calibration_networks: Optional[int] = typer.Option(None, help="Fresh inits a calibration is fitted on when this evaluation "
                                                       "fits one (default: EvalRequest's 64; fewer is faster and noisier)"),
    optimiser_steps: Optional[int] = typer.Option(None, help="The longest SGD and Adam runs G.pt's one update is compared "
                                                  "with (default: EvalRequest's 512; the curves cost 2 x this many training steps)"),
):
    """Prompt G.pt with a range of desired metrics and report achieved vs requested."""
    url = store or default_store_url()
    with user_errors():
        if min(networks or 2, prompts or 2, calibration_networks or 2) < 2:
            raise StoreError("--networks, --prompts and --calibration-networks must be at least 2")
        if optimiser_steps is not None and optimiser_steps < 1:
            raise StoreError("--optimiser-steps must be at least 1")
        with prefect_server() as server_ready:  # the server starts while torch loads and the model is checked
            from gptpipe.gpt.diffusion import SAMPLERS
            from storage import evals, models
            from storage.store import open_store

            if sampler and sampler not in SAMPLERS:
                raise StoreError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
            if device is not None:
                from gptpipe.gpt.trainer import resolve_device

                resolve_device(device)  # a device that is not here: one line now
            st = open_store(url)
            model = model or models.newest(st)
            lineage = models.read_lineage(st, model)
            defaults = lineage.get("train_config", {})  # how the model is sampled unless told otherwise
            check_guidance(guidance, defaults.get("prompt_dropout"), model)
            check_temperature(temperature, sampler or defaults.get("sampler", "ddim"))
            if sampler == "mean" and temperature is None and defaults.get("temperature", 1.0) != 1.0:
                raise StoreError(f"{model} is sampled at temperature {defaults['temperature']:g}, which the 'mean' sampler "
                                 "cannot do: add --temperature 1")
            if eval:
                evals.check_new(st, eval)
            from flows.evaluate import evaluate_flow

            server_ready()
            with console.status(f"evaluating {model}"):
                summary = evaluate_flow(store=url, model=model, eval=eval, data_root=data_root,
                                        **given(networks=networks, prompts=prompts, recursive=recursive, sampler=sampler,
                                                sample_steps=sample_steps, guidance=guidance, temperature=temperature,
                                                seed=seed, device=device,
                                                calibrate=None if calibration else False,
                                                calibration_networks=calibration_networks, optimiser_steps=optimiser_steps))
    _print_summary(url, summary)


def _echo_summary(what: str, summary: dict) -> None:
    """One line: ``what: key=value, ...`` (floats to 4 significant digits)."""
    typer.echo(f"{what}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


def _ratio_note(s: dict, metric: str) -> str:
    """"; one step = 1.45× ± 0.04 the recipe's 25 epochs" (paired over the same fresh inits), where known."""
    from gptpipe.evaluation.report import ratio_to_recipe

    shown = ratio_to_recipe(s, metric)
    return "" if shown == "n/a" else f"; one step = {shown} the recipe's 25 epochs"


def _print_summary(url: str, s: dict) -> None:
    m = s["metric"]
    typer.echo(f"evaluation {s['eval']} of {s['model']} ({s['problem']}, prompted with {m}):")
    typer.echo(f"  prompt alignment R²: held-out runs {s.get('r2_heldout_run', float('nan')):.3f}, "
               f"fresh inits {s.get('r2_fresh_init', float('nan')):.3f} (medians {s.get('r2_median_heldout_run', float('nan')):.3f} / "
               f"{s.get('r2_median_fresh_init', float('nan')):.3f}; Pearson {s.get('pearson_all', float('nan')):.3f})")
    for metric in dict.fromkeys((m, "test_error")):
        if f"one_step_best_prompt_{metric}_mean" in s:
            typer.echo(f"  {metric}, fresh inits: start {s[f'start_{metric}_mean']:.4g} -> G.pt one step {s[f'one_step_best_prompt_{metric}_mean']:.4g} "
                       f"(best {s[f'one_step_best_prompt_{metric}_best']:.4g}); the sweep's recipe: 1 epoch {s[f'sgd_1_epoch_{metric}_mean']:.4g}, "
                       f"25 epochs {s[f'sgd_25_epochs_{metric}_mean']:.4g}{_ratio_note(s, metric)}")
    if "nn_distance_generated_median" in s:
        typer.echo(f"  not copies: median distance to the nearest training checkpoint {s['nn_distance_generated_median']:.4g} "
                   f"(held-out runs' own: {s['nn_distance_heldout_final_median']:.4g} final, "
                   f"{s['nn_distance_heldout_at_level_median']:.4g} at the samples' level); {m} of G.pt's samples "
                   f"{s['generated_best_prompt_mean']:.4g}, of training checkpoints + noise at that distance "
                   f"{s[f'copies_plus_noise_{m}_at_generated_distance']:.4g}")
    from storage import evals
    from storage.store import open_store

    typer.echo(f"  report: {evals.report_url(open_store(url), s['eval'])}")


@dataclass(frozen=True)
class Demo:
    """One problem's demo: sweep and G.pt settings measured to work on 2 CPU cores (README figures)."""

    name: str  # sweep and model name: a new one whenever the settings change, so old stores keep working
    runs: int
    checkpoints: int
    steps: int
    networks: int
    model: str | None = None  # the model's name where it differs from the sweep's (new G.pt settings on the same sweep)
    prompts: int = 20
    calibration_networks: int | None = None  # None: EvalRequest's
    optimiser_steps: int | None = None  # None: EvalRequest's
    lr_min: float | None = None
    lr_max: float | None = None
    data_order: str | None = None  # None: SweepConfig's default
    checkpoint_spacing: str | None = None
    shard_size: int | None = None
    runner: str = "thread"
    memory_budget: float | None = None
    pairing: str | None = None  # None: TrainConfig's default
    compile: bool = False  # torch.compile the training step: pays from ~1,100 steps on (bench/gpt.py compile)
    temperature: float | None = None  # the model's sampling temperature; None: TrainConfig's (1)
    candidates: int = 1  # G.pts trained, the best by validation kept (gptpipe.stages.candidates)
    choose_by: str | None = None  # how the candidates are scored; None: one-update


DEMOS = {
    # Learning rates 0.1-0.3 rather than the recipe's 0.01-0.3: below 0.1 runs end undertrained (best test loss
    # 0.47-1.37 against 0.40), and G.pt learns better from well-trained runs (docs/gpt-ablations.md)
    "digits_mlp": Demo("demo-8192-lr0.1", runs=8192, checkpoints=40, steps=2500, networks=128, lr_min=0.1, lr_max=0.3),
    # mnist: lr 0.02-0.1 (from 0.2 up runs lose hidden units: mean final test error 24% for 0.1-0.3), one data
    # order per epoch for the sweep (2.4x faster), checkpoints dense early so the loss range 2.3 -> 0.3 is covered
    # (linear spacing jumps from 2.3 to 0.97 at the first checkpoint), all 5.2 GB of checkpoints in memory;
    # 13,500 G.pt steps (one-step test error 1.39x / 1.41x the recipe's, against 1.58x / 1.53x after 9,000 on the
    # same sweep, 1.67x after 6,000), compiled (0.25 against 0.32 s/step on 2 cores, after ~50 s of compiling);
    # sampled at temperature 0.5 (one-step error 0.02-0.06x lower in all six evaluations of three trainings, R² no
    # lower); 256 start networks (192 fresh inits): over 64 the one-step ratio has a standard error of 0.04-0.06x;
    # two trainings, the better by validation kept: one training to the next lands 1.39-1.59x the recipe's error
    "mnist_mlp": Demo("demo-mnist-8192", model="demo-mnist-8192-best2", runs=8192, checkpoints=20, steps=13500,
                      networks=256, lr_min=0.02, lr_max=0.1, data_order="shared", checkpoint_spacing="log",
                      memory_budget=7e9, compile=True, temperature=0.5, candidates=2),
    # CartPole: PPO's recipe, checkpoints every iteration for the first 30 (returns 37 -> 350 on average) so
    # G.pt sees the whole range of returns it is prompted with; processes, as gymnasium's numpy holds the GIL.
    # 3,072 runs trained 6,000 steps (twice the runs only pays with twice the steps); 128 runs per shard, 1.39x
    # faster PPO than 32; a tenth of the pairs "stay" (target = start), without which what G.pt returns for a
    # prompt at its start's return changed from one training to the next (docs/gpt-ablations.md); 128 start
    # policies, as the README's figures: with 64, the handful that start above 100 moved R² by ~0.1 from draw to draw;
    # sampled at temperature 0.5 (R² 0.03-0.08 higher on all three trainings measured); three trainings, the best
    # by the alignment of 1,024 validation policies kept: one training to the next moves R² by up to 0.15
    "cartpole": Demo("demo-cartpole-3072", model="demo-cartpole-3072-best3", runs=3072, checkpoints=40, steps=6000,
                     networks=128, prompts=10, checkpoint_spacing="log", shard_size=128, runner="process", compile=True,
                     pairing="stay", temperature=0.5, candidates=3, choose_by="alignment"),
}


@app.command()
def demo(
    store: Optional[str] = StoreOpt,
    problem: str = typer.Option("digits_mlp", help=f"The problem to run the pipeline on: {', '.join(DEMOS)}"),
):
    """The whole pipeline on an embedded data set (local store by default): collect, train, evaluate,
    as the pipeline flow runs them. Re-running reuses the stored sweep and model and writes a new evaluation."""
    from datetime import datetime, timezone

    url = store or default_store_url()
    with user_errors():
        if problem not in DEMOS:
            raise StoreError(f"no demo for problem {problem!r} (choose from {', '.join(DEMOS)})")
        with prefect_server() as server_ready:  # the server starts while torch loads and the sweep is checked
            from flows.runners import torch_threads_per_task
            from gptpipe import problems as problems_mod
            from gptpipe.stages import collect as collect_stage
            from gptpipe.sweep.config import SweepConfig
            from storage import evals, sweeps

            d = DEMOS[problem]
            recipe = given(checkpoints=d.checkpoints, shard_size=d.shard_size, lr_min=d.lr_min, lr_max=d.lr_max,
                           data_order=d.data_order, checkpoint_spacing=d.checkpoint_spacing)
            config = SweepConfig(problem=problem, runs=d.runs, **recipe)
            collect_stage.check(url, d.name, config, None)
            typer.echo(f"store: {url}")
            workers = os.cpu_count() or 1
            model = d.model or d.name
            eval_name = f"{model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"

            bars = [(f"collect {d.name}", config.n_shards, store_poll(url, lambda st: len(sweeps.committed_shards(st, d.name)))),
                    (f"train {model}", d.steps * d.candidates, store_poll(url, lambda st: trained_steps(st, model, d.candidates))),
                    (f"evaluate {eval_name}", 1, store_poll(url, lambda st: int(evals.exists(st, eval_name))))]
            from flows.pipeline import pipeline_flow

            server_ready()
            with progress_bars(bars):
                summary = pipeline_flow(
                    sweep=d.name, problem=problem, runs=d.runs, model=model, store=url, stages="subflows", runner=d.runner,
                    workers=workers, collect_options={**recipe, "torch_threads": torch_threads_per_task(workers)},
                    train_options=given(steps=d.steps, pairing=d.pairing, memory_budget=d.memory_budget and int(d.memory_budget),
                                        compile=d.compile or None, temperature=d.temperature,
                                        candidates=d.candidates if d.candidates > 1 else None, choose_by=d.choose_by),
                    evaluate_options={"eval": eval_name, "networks": d.networks, "prompts": d.prompts,
                                      **given(calibration_networks=d.calibration_networks, optimiser_steps=d.optimiser_steps)})
    metric = problems_mod.get(problem).primary
    typer.echo(f"{metric} per learning-rate bucket (means over runs):")
    catalog(sql=f"select round(log10(lr), 1) as log10_lr, count(*) as runs, avg(best_{metric}) as best_{metric}, "
                f"avg(final_{metric}) as final_{metric} from runs where sweep = '{d.name}' group by 1 order by 1",
            store=url, format="table")
    _echo_summary(f"sweep {d.name}", {k.removeprefix("sweep_"): v for k, v in summary.items() if k.startswith("sweep_")})
    _echo_summary(f"model {model}", {"step": summary["model_step"]})
    _print_summary(url, summary)


@app.command("import-gpt")
def import_gpt(
    path: str = typer.Argument(..., help="An official G.pt checkpoint dataset folder (e.g. checkpoint_datasets/mnist)"),
    sweep: str = typer.Option(..., help="Sweep name to import into"),
    problem: str = typer.Option(..., help="mnist_mlp, cifar_cnn or cartpole"),
    store: Optional[str] = StoreOpt,
    checkpoints: int = typer.Option(200, help="Checkpoints per run (200 in the released datasets)"),
    shard_size: int = typer.Option(16, help="Runs per shard = per task and per commit (16 x 200 MNIST checkpoints = 100 MB)"),
    workers: Optional[int] = typer.Option(None, help="Concurrent shard tasks (default: one per core)"),
):
    """Import a released G.pt checkpoint dataset (LMDB layout) as a sweep. Re-running resumes."""
    from flows.runners import task_runner

    url = store or default_store_url()
    with user_errors():
        if workers is not None and workers < 1:
            raise StoreError(f"--workers must be at least 1, got {workers}")
        check_name(sweep)
        with prefect_server() as server_ready:  # the server starts while torch loads and the source is checked
            from gptpipe.stages import interop
            from storage import sweeps
            from storage.store import open_store

            config, _ = interop.check(url, sweep, problem, path, checkpoints, shard_size)
            from flows.interop import import_flow

            flow = import_flow.with_options(task_runner=task_runner("thread", workers or (os.cpu_count() or 1)))
            server_ready()
            with progress_bar(f"import {sweep}", interop.n_shards(config), store_poll(url, lambda st: len(sweeps.committed_shards(st, sweep)))):
                summary = flow(store=url, sweep=sweep, problem=problem, source=path, checkpoints=checkpoints, shard_size=shard_size)
            bad = interop.report_rows(open_store(url), sweep)
    for r in bad[:20]:
        typer.echo(f"  run {r['run']} ({r['source_run']}): {r['status']}, {r['n_ckpts']} checkpoints: {r['note']}", err=True)
    if len(bad) > 20:
        typer.echo(f"  ... {len(bad) - 20} more: gptpipe catalog \"select * from runs where sweep = '{sweep}' and status != 'ok'\"", err=True)
    _echo_summary(f"sweep {sweep} in {url}", summary)


@app.command()
def verify(
    sweep: str = typer.Option(..., help="Sweep to check"),
    store: Optional[str] = StoreOpt,
    repair: bool = typer.Option(False, "--repair", help="Take back the commits of shards with damaged runs, so that "
                                "re-running the collect (or import) command trains them again"),
):
    """Read back every committed run of a sweep and check it against the digest its commit recorded."""
    from storage import sweeps
    from storage.store import open_store

    with user_errors():
        check_name(sweep)
        st = open_store(store or default_store_url())
        n, damaged = sweeps.verify(st, sweep)
    for row in damaged:
        typer.echo(f"  run {row['run']}: {row['problem']}", err=True)
    typer.echo(f"sweep {sweep}: {n - len(damaged)} of {n} committed runs intact" + (f", {len(damaged)} damaged" if damaged else ""))
    if damaged and repair:
        shards = sweeps.uncommit_damaged(st, sweep, damaged)
        typer.echo(f"uncommitted shards {', '.join(map(str, shards))}: re-run the sweep's collect (or import) command to redo them")
    if damaged:
        raise typer.Exit(1)


@app.command("export")
def export_params(
    out: str = typer.Argument(..., help="Output file: .safetensors (default) or .pt/.pth (torch state_dict)"),
    store: Optional[str] = StoreOpt,
    sweep: Optional[str] = typer.Option(None, help="Sweep of the checkpoint"),
    run: Optional[int] = typer.Option(None, help="Run of the checkpoint"),
    ckpt: Optional[int] = typer.Option(None, help="Checkpoint index within the run"),
    eval: Optional[str] = typer.Option(None, "--eval", help="Evaluation whose generated parameters to export"),
    row: Optional[int] = typer.Option(None, help="Row of the evaluation's results"),
):
    """Write a stored checkpoint or a generated network as a PyTorch state_dict (safetensors or .pt)."""
    from gptpipe.stages import interop

    with user_errors():
        meta = interop.export(store or default_store_url(), out, sweep=sweep, run=run, ckpt=ckpt, eval=eval, row=row)
    typer.echo(f"{out}: {meta['problem']} state_dict for problems.get({meta['problem']!r}).module()")


@app.command("prompt")
def prompt_cmd(
    input: str = typer.Argument(..., help="Your network's state_dict: .safetensors, or .pt/.pth from torch.save(module.state_dict())"),
    out: str = typer.Argument(..., help="Where to write the new state_dict (.safetensors, or .pt/.pth)"),
    target: float = typer.Option(..., help="The metric value to ask for (e.g. a test loss)"),
    model: Optional[str] = typer.Option(None, help="G.pt model (default: the newest in the store)"),
    store: Optional[str] = StoreOpt,
    metric: Optional[str] = typer.Option(None, help="The metric of --target: must be the one the model was trained on"),
    samples: Optional[int] = typer.Option(None, help="Candidates per update; the best is kept when the data is at hand (default 1)"),
    steps: Optional[int] = typer.Option(None, help="Recursive G.pt updates (default 1)"),
    current: Optional[float] = typer.Option(None, help="Your network's current metric, when the problem's data is not at hand"),
    data_root: Optional[str] = typer.Option(None, help="Folder with the problem's torchvision data (mnist, cifar10)"),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (default 0)"),
):
    """Use a trained G.pt on your own network: new parameters that reach --target in one update."""
    from gptpipe.stages import interop
    from gptpipe.stages.prompt import TrainedGpt, read_state_dict
    from storage.store import open_store

    url = store or default_store_url()
    with user_errors():
        interop.check_out_folder(out)
        state_dict = read_state_dict(input)
        gpt = TrainedGpt.load(open_store(url), model, data_root)
        if metric is not None and metric != gpt.metric:
            raise StoreError(f"model {gpt.name} is prompted with {gpt.metric}, not {metric}")
        result = gpt.update(state_dict, target, current=current, **given(samples=samples, steps=steps, seed=seed))
    kept = result.state_dicts[:1] if result.achieved else result.state_dicts  # scored: the best; else every sample
    outs = [out] if len(kept) == 1 else [_numbered(out, i) for i in range(len(kept))]
    for sd, path in zip(kept, outs):
        interop.write_state_dict(sd, path, {"problem": gpt.problem.name, "model": gpt.name, "metric": gpt.metric,
                                           "requested": str(target)})
    if result.note:
        typer.echo(f"note: {result.note}", err=True)
    got = f"{result.achieved[0]:.4g}" if result.achieved else "not scored (no data at hand)"
    typer.echo(f"{gpt.metric}: start {result.start:.4g} -> {got} (requested {target:.4g}); wrote {', '.join(outs)}")


def _numbered(path: str, i: int) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}-{i}{ext}"


@store_app.command("serve")
def store_serve(
    dir: str = typer.Option(os.path.join(os.path.expanduser("~"), ".gptpipe", "s3"), "--dir", help="Data folder"),
    port: int = typer.Option(8333, "--port", help="S3 port on 127.0.0.1"),
    bucket: str = typer.Option("gptpipe", "--bucket", help="Bucket to create"),
):
    """Run a local S3-compatible object store (SeaweedFS) until Ctrl-C."""
    from storage.s3server import serve_forever

    with user_errors():
        rc = serve_forever(dir, port, bucket=bucket)
    if rc:
        raise typer.Exit(rc)


if __name__ == "__main__":
    app()
