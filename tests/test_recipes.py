"""The recipes: every YAML config parses into the paper's settings, and each recipe trains the embedded model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import REPO_ROOT
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

from trl_flowrl import ExGRPOConfig, FlowRLConfig
from trl_flowrl.recipe import RecipeArguments, parse_recipe_args, run


CONFIGS = REPO_ROOT / "recipes" / "configs"

# file: (config class, model, processes the batch mapping assumes, completions per optimizer step, completions per
# generation batch, optimizer steps per generation batch, temperature, dataset) -- the papers' tables.
PAPER_CONFIGS = {
    "flowrl_qwen2.5-7b_dapo-math": (FlowRLConfig, "Qwen/Qwen2.5-7B", 8, 256, 512 * 8, 16, 1.0, "dapo_math"),
    "grpo_qwen2.5-7b_dapo-math": (GRPOConfig, "Qwen/Qwen2.5-7B", 8, 256, 512 * 8, 16, 1.0, "dapo_math"),
    "flowrl_qwen2.5-32b_dapo-math": (FlowRLConfig, "Qwen/Qwen2.5-32B", 32, 256, 512 * 8, 16, 1.0, "dapo_math"),
    "grpo_qwen2.5-32b_dapo-math": (GRPOConfig, "Qwen/Qwen2.5-32B", 32, 256, 512 * 8, 16, 1.0, "dapo_math"),
    "flowrl_r1-distill-qwen-7b_deepcoder": (
        FlowRLConfig,
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        8,
        256,
        64 * 8,
        2,
        0.6,
        "deepcoder",
    ),
    "grpo_r1-distill-qwen-7b_deepcoder": (
        GRPOConfig,
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        8,
        256,
        64 * 8,
        2,
        0.6,
        "deepcoder",
    ),
    "exgrpo_qwen2.5-math-7b_openr1": (ExGRPOConfig, "Qwen/Qwen2.5-Math-7B", 8, 512, 128 * 8, 2, 1.0, "openr1_math"),
    "grpo_qwen2.5-math-7b_openr1": (GRPOConfig, "Qwen/Qwen2.5-Math-7B", 8, 512, 128 * 8, 2, 1.0, "openr1_math"),
}


def parse(config_cls, path, monkeypatch):
    # The paper configs train in bf16 on GPUs; let them parse on this CPU machine.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    parser = TrlParser((RecipeArguments, config_cls, ModelConfig))
    return parser.parse_args_and_config(args=["--config", str(path)])


def test_every_config_file_is_covered():
    on_disk = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert on_disk == set(PAPER_CONFIGS)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_parses_into_the_paper_settings(name, monkeypatch):
    config_cls, model, processes, per_step, per_generation, updates, temperature, dataset = PAPER_CONFIGS[name]
    script_args, args, model_args = parse(config_cls, CONFIGS / f"{name}.yaml", monkeypatch)
    assert type(args) is config_cls
    assert model_args.model_name_or_path == model and model_args.dtype == "bfloat16"
    assert script_args.dataset_name == dataset
    assert script_args.reward == ("code" if dataset == "deepcoder" else "math")
    # The batch mapping written in each file's header
    assert args.per_device_train_batch_size * processes * args.gradient_accumulation_steps == per_step
    assert args.per_device_train_batch_size * processes * args.steps_per_generation == per_generation
    assert args.steps_per_generation // args.gradient_accumulation_steps == updates
    assert args.num_generations == 8 and args.num_iterations == 1
    assert args.max_completion_length == 8192 and args.temperature == temperature
    assert args.learning_rate == 1e-6 and args.max_grad_norm == 1.0 and args.bf16
    assert args.use_vllm and args.vllm_mode == "colocate"
    if config_cls is FlowRLConfig:
        assert args.beta == 15.0 and args.importance_weight_clipping == "clamp" and args.importance_weight_max == 10
        assert args.reward_in_residual == "advantage" and args.log_z_num_layers == 3 and args.log_z_dropout == 0.1
        assert args.weight_decay == 0.1 and args.lr_scheduler_type == "constant_with_warmup"
        assert args.warmup_steps == 10 * updates  # the paper's 10 warm-up rollout batches
        assert script_args.max_prompt_length == 2048
    elif config_cls is ExGRPOConfig:
        assert (args.replay_ratio, args.delayed_start_threshold, args.replay_weight_shaping) == (0.5, 0.35, 0.1)
        assert args.bucket_center is None and args.bucket_width == 1.0
        assert args.trajectory_selection == "lowest_entropy" and args.unclip_fresh_after_switch
        assert args.loss_type == "dr_grpo" and args.scale_rewards == "none" and args.beta == 0.0
        assert args.lr_scheduler_type == "constant" and args.max_steps == 600 * updates
    else:
        assert args.beta == 0.0
    if dataset == "dapo_math":
        assert args.max_steps == 200 * updates  # about 200 rollout batches in the paper's checkpoints
    if dataset == "deepcoder":
        assert script_args.code_scoring == "all_or_nothing" and script_args.code_executor == "local"


@pytest.mark.parametrize(
    "config_cls, name",
    [
        (FlowRLConfig, "flowrl_arithmetic"),
        (GRPOConfig, "grpo_arithmetic"),
        (ExGRPOConfig, "exgrpo_arithmetic"),
        (FlowRLConfig, "flowrl_programs"),
        (GRPOConfig, "grpo_programs"),
    ],
)
def test_embedded_configs_parse_and_are_read_without_arguments(config_cls, name, tmp_path, monkeypatch):
    path = CONFIGS / "embedded" / f"{name}.yaml"
    script_args, args, model_args = parse_recipe_args(config_cls, path, argv=["--output_dir", str(tmp_path)])
    assert type(args) is config_cls and model_args.model_name_or_path is None  # None: the embedded model
    task = name.split("_")[1]
    assert script_args.dataset_name == task == script_args.task
    assert script_args.reward == ("code" if task == "programs" else "math")
    assert args.output_dir == str(tmp_path)  # a flag overrides the file
    assert args.num_generations == 8 and not args.bf16
    assert args.max_completion_length == (128 if task == "programs" else 64)
    # With a model of one's own, the embedded file is not read (and TRL's GPU defaults, bf16 included, apply)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    script_args, args, model_args = parse_recipe_args(
        config_cls, path, argv=["--model_name_or_path", "org/model"], default_dataset=task
    )
    default = config_cls.__dataclass_fields__["max_completion_length"].default
    assert model_args.model_name_or_path == "org/model" and args.max_completion_length == default
    # ... but the recipe's task still applies: a code recipe given only a model trains on the programs task
    assert script_args.dataset_name == task and script_args.reward == ("code" if task == "programs" else "math")


def test_accelerate_configs_use_only_known_keys():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    launch_options = {o.lstrip("-") for action in launch_command_parser()._actions for o in action.option_strings}
    files = sorted((REPO_ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {f.stem for f in files} == {"ddp", "zero3", "fsdp2"}
    for path in files:
        config = ClusterConfig.from_yaml_file(str(path))  # raises on an unknown top-level key
        for section in ("deepspeed_config", "fsdp_config"):
            unknown = set(getattr(config, section) or {}) - launch_options
            assert not unknown, f"{path.name}: {section} has unknown keys {unknown}"
        assert yaml.safe_load(path.read_text())["mixed_precision"] == "bf16"


def test_every_embedded_config_is_covered():
    embedded = {p.stem for p in (CONFIGS / "embedded").glob("*.yaml")}
    assert embedded == {
        "flowrl_arithmetic",
        "grpo_arithmetic",
        "exgrpo_arithmetic",
        "flowrl_programs",
        "grpo_programs",
    }
    scripts = {p.stem for p in (REPO_ROOT / "recipes").glob("*.py")}
    assert scripts == {"flowrl_math", "exgrpo_math", "grpo_math", "flowrl_code", "grpo_code"}


def test_a_hub_dataset_without_a_model_is_a_clear_error():
    script_args, args, model_args = parse_recipe_args(
        GRPOConfig, CONFIGS / "embedded" / "grpo_arithmetic.yaml", argv=["--dataset_name", "dapo_math"]
    )
    with pytest.raises(ValueError, match="--model_name_or_path"):
        run(GRPOTrainer, script_args, args, model_args)


def test_a_wrong_model_path_is_a_clear_error(tmp_path, monkeypatch):
    # It said "Your setup doesn't support bf16/gpu" (the TRL default bf16=True, checked while parsing, on a CPU).
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: /no/such/model\n")
    embedded = CONFIGS / "embedded" / "grpo_arithmetic.yaml"
    for argv in (
        ["--model_name_or_path", "./nope"],
        ["--model_name_or_path=runs/x/checkpoint-9"],
        ["--config", str(config)],
    ):
        with pytest.raises(FileNotFoundError, match="does not exist.*give a checkpoint directory"):
            parse_recipe_args(GRPOConfig, embedded, argv=argv)
    # `run` checks too, before anything is loaded (a hub id not in the cache, offline)
    script_args, args, model_args = parse_recipe_args(GRPOConfig, embedded, argv=["--output_dir", str(tmp_path)])
    model_args.model_name_or_path = "org/not-cached-model"
    with pytest.raises(FileNotFoundError, match="huggingface-cli download org/not-cached-model"):
        run(GRPOTrainer, script_args, args, model_args)


@pytest.mark.parametrize(
    "recipe, paths",
    [("flowrl_math", "paths"), ("exgrpo_math", "paths"), ("grpo_math", "paths"), ("flowrl_code", "programs"),
     ("grpo_code", "programs")],
)  # fmt: skip
def test_recipe_trains_the_embedded_model_for_two_steps(recipe, paths, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("OMP_NUM_THREADS", None)  # the embedded runs then choose one thread themselves
    command = [
        sys.executable,
        str(REPO_ROOT / "recipes" / f"{recipe}.py"),
        "--max_steps=2",
        "--per_device_train_batch_size=16",
        "--num_train_problems=32",
        "--num_eval_problems=4",
        "--eval_samples=2",
        f"--output_dir={tmp_path}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "4 held-out problems x 2 samples" in result.stdout
    assert f"distinct correct {paths} per problem" in result.stdout
    assert "Using 1 CPU thread(s)" in result.stdout
    assert f"packages: torch {torch.__version__}, transformers {transformers.__version__}, trl " in result.stdout
    assert (Path(tmp_path) / "model.safetensors").is_file()


def test_cpu_thread_count_follows_the_flag_then_the_environment(monkeypatch):
    from trl_flowrl.cpu import cpu_threads, use_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads() == 1  # the embedded models' default
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3  # the user's environment wins over the default
    assert cpu_threads(2) == 2  # and a flag over the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer"):
        cpu_threads()
    with pytest.raises(ValueError, match="at least 1"):
        cpu_threads(0)
    import torch

    before = torch.get_num_threads()
    try:
        assert use_cpu_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "environ, world_size, has_accelerator, expected",
    [
        ({}, 1, False, None),
        ({"WORLD_SIZE": "2"}, 2, False, None),  # DDP on the CPU (gloo)
        ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}, 8, True, None),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, 1, True, None),
        ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, 2, False, "asks for FSDP"),  # use_cpu: true -> DDP
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, 1, False, "asks for DeepSpeed"),
        ({"WORLD_SIZE": "2"}, 1, False, "2 processes were launched but they did not join"),
    ],
)
def test_launch_problems_are_named(environ, world_size, has_accelerator, expected):
    from trl_flowrl.recipe import launch_problem

    problem = launch_problem(environ, world_size, has_accelerator)
    assert problem is None if expected is None else expected in problem


@pytest.mark.multiprocess
def test_an_fsdp_launch_on_a_machine_without_gpus_stops_before_writing(tmp_path):
    """The repository's FSDP2 config with two processes, as a user would try it here: refused, nothing written."""
    config = yaml.safe_load((REPO_ROOT / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    config["num_processes"] = 2
    config_file = tmp_path / "fsdp2.yaml"
    config_file.write_text(yaml.safe_dump(config))
    output_dir = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--main_process_port",
        "0",
        str(REPO_ROOT / "recipes" / "flowrl_math.py"),
        "--max_steps=1",
        f"--output_dir={output_dir}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode != 0
    assert "Refusing to train: the accelerate config asks for FSDP" in result.stdout + result.stderr
    assert not output_dir.exists()
