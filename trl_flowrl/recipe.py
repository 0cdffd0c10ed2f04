"""The logic behind the scripts in `recipes/`: data, reward, trainer, and the before/after summary.

A recipe script is three lines: parse `(RecipeArguments, <Algorithm>Config, ModelConfig)` with TRL's `TrlParser` and
call `run(trainer_cls, ...)`. With no `--config` and no `--model_name_or_path`, `parse_recipe_args` reads the
script's embedded default (`recipes/configs/embedded/*.yaml`): the tiny model shipped in this package, trained on a
built-in task, offline, on a CPU, in minutes. With a config file, the same code runs the papers' setups.

What `run` does, in order:
1. the model: `model_name_or_path`, or the embedded model of the built-in task (`trl_flowrl.tasks`);
2. the dataset: a built-in task (`arithmetic`, `programs`) or a loader of `trl_flowrl.data.DATASETS` (from the hub, or
   from `dataset_path`), minus prompts longer than `max_prompt_length` tokens;
3. the reward: the math-verify reward (`MathAccuracyReward`) or the sandboxed code reward (`CodeReward`);
4. for a built-in task, held-out accuracy and distinct correct paths (or programs) of the initial model (main
   process, `trl_flowrl.evaluation`);
5. training, saving the model to `output_dir`;
6. for a built-in task, the same measurement on the trained model, printed beside the first.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_flowrl._compat import package_versions


BUILTIN_TASKS = ("arithmetic", "programs")
MATH_DATASETS = ("dapo_math", "openr1_math", "math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
CODE_DATASETS = ("deepcoder", "humanevalplus", "livecodebench")


@dataclass
class RecipeArguments(ScriptArguments):
    """Data, reward and summary options of the recipes (the trainer's options are its config's, the model's
    `ModelConfig`'s).

    Parameters:
        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            A built-in task of `trl_flowrl.tasks` (`"arithmetic"` or `"programs"`), or a name of
            `trl_flowrl.data.DATASETS`: `dapo_math`, `openr1_math`, `deepcoder`, ... None: the recipe's own task
            (`parse_recipe_args`'s `default_dataset`: `arithmetic` for the math recipes, `programs` for the code
            ones).
        dataset_path (`str` or `None`, *optional*, defaults to `None`):
            A local copy of the hub dataset (a `huggingface-cli download --local-dir` folder, a `save_to_disk`
            folder or data files), for machines without hub access.
        max_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            Drop training prompts longer than this many tokens (chat template included), as veRL's overlong-prompt
            filter does (the FlowRL paper: 2048). None keeps every prompt.
        reward (`str` or `None`, *optional*, defaults to `None`):
            `"math"` (math-verify equivalence of the `\\boxed{}` or `Answer:` answer with the `solution` column) or
            `"code"` (the last code block run against the `tests` column in a sandbox). None: chosen from the dataset
            (`code` for `programs` and the code datasets).
        math_answer_format (`str`, *optional*, defaults to `"auto"`):
            Where the math reward reads the answer: `"auto"` (the later of the last `\\boxed{}` and the last
            `Answer:` line), `"boxed"` or `"answer_line"`.
        code_executor (`str`, *optional*, defaults to `"local"`):
            `"local"` (a sandboxed subprocess per program, see `trl_flowrl.rewards.LocalSandbox`) or `"sandboxfusion"`
            (a SandboxFusion server at `sandbox_url`).
        sandbox_url (`str`, *optional*, defaults to `"http://localhost:8080"`):
            The SandboxFusion server, for `code_executor="sandboxfusion"`.
        code_scoring (`str`, *optional*, defaults to `"all_or_nothing"`):
            `"all_or_nothing"` (1 only if every test passes, the papers' reward) or `"fraction"` of tests passed.
        code_timeout (`float`, *optional*, defaults to `6.0`):
            Seconds per test case.
        code_max_concurrency (`int`, *optional*, defaults to `2`):
            Programs run at once per process.
        num_train_problems (`int`, *optional*, defaults to `2000`):
            Training problems drawn for a built-in task (for `programs`, drawn with repeats from its 306).
        num_eval_problems (`int`, *optional*, defaults to `64`):
            Held-out problems of the before/after summary of a built-in task (0 skips the summary; `programs` has
            34, and asking for more uses those 34).
        eval_samples (`int`, *optional*, defaults to `8`):
            Samples per held-out problem in the summary, drawn at the training temperature.
        num_threads (`int` or `None`, *optional*, defaults to `None`):
            Torch CPU threads. None: for the embedded models on a CPU, `OMP_NUM_THREADS` if set, else 1 (a tiny model
            gains nothing from more and loses a lot on a shared machine, see `trl_flowrl.cpu`); otherwise torch's
            default. A value always applies.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "'arithmetic' or 'programs' (built-in) or a name of trl_flowrl.data.DATASETS (dapo_math, ...); "
            "default: the recipe's own task."
        },
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "Local copy of the hub dataset (folder or data files)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Drop prompts longer than this many tokens (FlowRL paper: 2048)."}
    )
    reward: str | None = field(
        default=None,
        metadata={"help": "'math' or 'code'; None chooses from the dataset.", "choices": ["math", "code", None]},
    )
    math_answer_format: str = field(
        default="auto",
        metadata={"help": "Where to read the math answer.", "choices": ["auto", "boxed", "answer_line"]},
    )
    code_executor: str = field(
        default="local",
        metadata={"help": "'local' sandbox or a 'sandboxfusion' server.", "choices": ["local", "sandboxfusion"]},
    )
    sandbox_url: str = field(default="http://localhost:8080", metadata={"help": "SandboxFusion server URL."})
    code_scoring: str = field(
        default="all_or_nothing",
        metadata={"help": "Code reward scoring.", "choices": ["all_or_nothing", "fraction"]},
    )
    code_timeout: float = field(default=6.0, metadata={"help": "Seconds per test case."})
    code_max_concurrency: int = field(default=2, metadata={"help": "Programs run at once per process."})
    num_train_problems: int = field(default=2000, metadata={"help": "Training problems of a built-in task."})
    num_eval_problems: int = field(
        default=64, metadata={"help": "Held-out problems of a built-in task's summary (0: no summary)."}
    )
    eval_samples: int = field(default=8, metadata={"help": "Samples per held-out problem in the summary."})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "Torch CPU threads. None: OMP_NUM_THREADS or 1 for the embedded models on a CPU."},
    )

    def __post_init__(self):
        name = self.dataset_name or "arithmetic"
        if name not in BUILTIN_TASKS + MATH_DATASETS + CODE_DATASETS:
            raise ValueError(
                f"Unknown dataset_name {self.dataset_name!r}: use one of {list(BUILTIN_TASKS + MATH_DATASETS + CODE_DATASETS)}."
            )
        if self.reward is None and self.dataset_name is not None:  # None: the recipe's default task decides
            self.reward = "code" if name in CODE_DATASETS + ("programs",) else "math"

    @property
    def task(self) -> str | None:
        """The built-in task trained on, or None for a hub dataset."""
        name = self.dataset_name or "arithmetic"
        return name if name in BUILTIN_TASKS else None


def parse_recipe_args(
    config_cls, embedded_config: str | Path, argv: list[str] | None = None, default_dataset: str = "arithmetic"
):
    """Parse `(RecipeArguments, config_cls, ModelConfig)` from the command line and `--config`.

    With neither `--config` nor `--model_name_or_path`, the embedded default `embedded_config` is read first, so
    `python recipes/flowrl_math.py` (and any override such as `--max_steps 50`) trains the embedded model. When no
    dataset is named anywhere, the recipe's `default_dataset` is used (`programs` for the code recipes), with its
    reward.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == flag or a.startswith(flag + "=") for a in argv for flag in ("--config", "--model_name_or_path")):
        argv = ["--config", str(embedded_config), *argv]
    model = _model_argument(argv)
    if model is not None:  # before the configs are built: theirs would be the first error (bf16 on a CPU, ...)
        from trl_flowrl.evaluation.generation import check_model_path

        check_model_path(model, offline_hub=False)
    parser = TrlParser((RecipeArguments, config_cls, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if script_args.dataset_name is None:
        script_args = dataclasses.replace(script_args, dataset_name=default_dataset)
    return script_args, training_args, model_args


def _model_argument(argv: list[str]) -> str | None:
    """`--model_name_or_path` from the command line, else from the `--config` file, else None."""
    for i, arg in enumerate(argv):
        if arg == "--model_name_or_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model_name_or_path="):
            return arg.partition("=")[2]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
        if isinstance(config, dict) and config.get("model_name_or_path") is not None:
            return str(config["model_name_or_path"])
    return None


def _load_dataset(script_args: RecipeArguments, seed: int):
    if script_args.task == "arithmetic":
        from trl_flowrl.tasks import arithmetic_dataset

        return arithmetic_dataset(script_args.num_train_problems, seed=seed, split="train")
    if script_args.task == "programs":
        from trl_flowrl.tasks import programming_dataset

        # 306 training problems: a longer run sees each several times, with new test inputs
        return programming_dataset(script_args.num_train_problems, seed=seed, split="train", unique=False)
    from trl_flowrl.data import DATASETS

    return DATASETS[script_args.dataset_name](local_path=script_args.dataset_path)


def _drop_long_prompts(dataset, tokenizer, max_prompt_length: int):
    def short_enough(row):
        ids = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        return len(ids) <= max_prompt_length

    kept = dataset.filter(short_enough, desc="Dropping overlong prompts")
    print(f"Kept {len(kept)} of {len(dataset)} prompts of at most {max_prompt_length} tokens.")
    return kept


def _build_reward(script_args: RecipeArguments):
    if (script_args.reward or "math") == "math":
        from trl_flowrl.rewards import MathAccuracyReward

        return MathAccuracyReward(answer_format=script_args.math_answer_format)
    from trl_flowrl.rewards import CodeReward, LocalSandbox, SandboxFusionExecutor, SandboxLimits

    if script_args.code_executor == "sandboxfusion":
        executor = SandboxFusionExecutor(script_args.sandbox_url, max_concurrency=script_args.code_max_concurrency)
    else:
        executor = LocalSandbox(
            SandboxLimits(timeout_s=script_args.code_timeout), max_concurrency=script_args.code_max_concurrency
        )
    return CodeReward(executor, scoring=script_args.code_scoring, timeout_per_test=script_args.code_timeout)


def _summary_benchmark(script_args: RecipeArguments, seed: int, reward):
    """The held-out problems of a built-in task, or None (no summary) for a hub dataset. The programs are graded in
    the training reward's own executor."""
    if script_args.task is None or script_args.num_eval_problems <= 0:
        return None
    from trl_flowrl.evaluation import arithmetic_benchmark, programs_benchmark
    from trl_flowrl.tasks import programming

    if script_args.task == "programs":
        num_problems = min(script_args.num_eval_problems, len(programming.all_problem_keys("test")))
        return programs_benchmark(
            num_problems,
            seed=seed,
            executor=getattr(reward, "executor", None),  # None (a non-code reward): a default LocalSandbox
            timeout_per_test=script_args.code_timeout,
        )
    return arithmetic_benchmark(num_problems=script_args.num_eval_problems, seed=seed)


def _measure(model_path: str, benchmark, script_args: RecipeArguments, training_args) -> dict:
    from trl_flowrl.evaluation import evaluate

    start = time.perf_counter()
    results = evaluate(
        model_path,
        [benchmark],
        num_samples=script_args.eval_samples,
        temperature=training_args.temperature,
        top_p=1.0,
        max_new_tokens=training_args.max_completion_length,
        backend="transformers",
        seed=training_args.seed,
        plots=False,
        progress=False,
    )
    (entry,) = results["models"].values()
    scores = entry["benchmarks"][benchmark.name]
    return {
        "accuracy": scores["avg_at_k"],
        "distinct_correct_paths": scores["diversity"]["distinct_correct_paths"],
        "seconds": time.perf_counter() - start,
    }


def _print_summary(
    name: str, benchmark, before: dict, after: dict, train_seconds: float, samples: int, versions: dict
) -> None:
    paths = "programs" if benchmark.name == "programs" else "paths"  # programs are told apart by syntax tree
    print(
        f"\n{name} on {len(benchmark)} held-out problems x {samples} samples "
        f"(training took {train_seconds / 60:.1f} min):\n"
        f"  accuracy (avg@{samples})                   {100 * before['accuracy']:5.1f}% -> {100 * after['accuracy']:5.1f}%\n"
        f"  {f'distinct correct {paths} per problem':<39}{before['distinct_correct_paths']:5.2f}  -> "
        f"{after['distinct_correct_paths']:5.2f}\n"
        # The same seed gives other figures under other versions (kernels, sampling, defaults).
        f"  packages: {', '.join(f'{name} {v}' for name, v in versions.items())}\n"
    )


def launch_problem(environ, world_size: int, has_accelerator: bool) -> str | None:
    """What is wrong with how the processes were launched, or None.

    Two launches that would run but lose work: an accelerate config that asks for FSDP or DeepSpeed on a machine
    with no accelerator (with `use_cpu: true` accelerate silently trains plain DDP instead), and several processes
    launched that did not join one distributed run (with `use_cpu: false` and no GPU, each process trains alone as
    rank 0, and all of them write the same `output_dir`).
    """
    sharding = [
        name
        for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
        if environ.get(variable, "false").lower() in ("1", "true", "yes")
    ]
    if sharding and not has_accelerator:
        return (
            f"the accelerate config asks for {sharding[0]}, which shards the model across accelerators, and this "
            "machine has none. On a CPU, train with `python recipes/<script>.py` or with several processes "
            "`accelerate launch --num_processes N --use_cpu recipes/<script>.py` (DDP); keep the FSDP and DeepSpeed "
            "configs in recipes/accelerate/ for GPU machines."
        )
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world_size != launched:
        return (
            f"{launched} processes were launched but they did not join one distributed run (each sees a world of "
            f"{world_size}), so each would train alone and all would write the same output_dir. Without a GPU, "
            "pass `--use_cpu` to `accelerate launch` (or `use_cpu: true` in its config) so that they train together "
            "with DDP over gloo."
        )
    return None


def check_launch(training_args) -> None:
    """Stop with a message, before anything is written, when `launch_problem` finds a problem."""
    import torch

    problem = launch_problem(os.environ, training_args.world_size, torch.accelerator.is_available())
    if problem is not None:
        raise SystemExit(f"Refusing to train: {problem}")


def run(trainer_cls, script_args: RecipeArguments, training_args, model_args: ModelConfig):
    """Train `trainer_cls` (GRPOTrainer or a subclass) as configured; returns the trainer."""
    from transformers import AutoTokenizer

    check_launch(training_args)

    from trl_flowrl.evaluation.generation import check_model_path
    from trl_flowrl.tasks import embedded_model_path

    model_path = model_args.model_name_or_path
    if model_path is not None:
        check_model_path(model_path)
    else:
        if script_args.task is None:
            raise ValueError(
                f"dataset_name={script_args.dataset_name!r} needs a model: pass --model_name_or_path (the embedded "
                f"models are trained on the built-in tasks {list(BUILTIN_TASKS)} only)."
            )
        model_path = embedded_model_path(script_args.task)
    import torch

    from trl_flowrl.cpu import use_cpu_threads

    if script_args.num_threads is not None or (
        model_args.model_name_or_path is None and not torch.cuda.is_available()
    ):
        threads = use_cpu_threads(script_args.num_threads)
        print(f"Using {threads} CPU thread(s) (--num_threads or OMP_NUM_THREADS to change).")
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    dataset = _load_dataset(script_args, training_args.seed)
    if script_args.max_prompt_length is not None:
        dataset = _drop_long_prompts(dataset, tokenizer, script_args.max_prompt_length)

    is_main = int(os.environ.get("RANK", "0")) == 0
    reward = _build_reward(script_args)
    benchmark = _summary_benchmark(script_args, training_args.seed, reward)
    before = _measure(model_path, benchmark, script_args, training_args) if benchmark and is_main else None

    from trl_flowrl.vllm_cpu import keep_cpu_weights_loadable

    keep_cpu_weights_loadable(training_args)  # vLLM's CPU build only: lets the weight sync reach the engine
    trainer = trainer_cls(
        model=model_path,
        reward_funcs=[reward],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - start
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")

    if before is not None and trainer.accelerator.is_main_process:
        after = _measure(training_args.output_dir, benchmark, script_args, training_args)
        versions = package_versions()
        _print_summary(
            trainer_cls.__name__, benchmark, before, after, train_seconds, script_args.eval_samples, versions
        )
        trainer.summary = {"before": before, "after": after, "train_seconds": train_seconds, "versions": versions}
    trainer.accelerator.wait_for_everyone()
    return trainer


def finish(trainer) -> None:
    """End the run: the trackers, then the process group (what `Trainer.end()` does from transformers 5.25 on).

    vLLM's colocate engine destroys its process groups itself when the process exits, and fails with "Invalid process
    group specified" when they are already gone, so with it only the trackers are ended here.
    """
    if trainer.args.use_vllm and trainer.args.vllm_mode == "colocate":
        for tracker in trainer.accelerator.trackers:
            tracker.finish()
    else:
        trainer.accelerator.end_training()
