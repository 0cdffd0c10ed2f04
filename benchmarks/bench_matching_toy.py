"""Why does FlowRL's matching objective match slowly, and which residual should its preset use? An enumerable toy.

A tiny autoregressive transformer (one prompt, 8 content tokens and an end-of-sequence token) is pre-trained to be the
reference: it writes one of 16 *valid* answers (9 tokens each, or 3 to 12 tokens with `--lengths unequal`) with uneven
probabilities (about 1/k for the k-th, together about a third of its mass) and otherwise a random sequence. A
completion is rewarded 1 when it is a valid answer followed by the end token, else 0. FlowRL's target is then
p*(y) ∝ π_ref(y) · exp(β · r(y)), and since only 16 sequences are rewarded, the policy's distance to it is exact:
teacher-forced log-probabilities of the 16 answers, and one remaining outcome, "anything else".

Each run trains the policy as the trainer does (sampled groups, the project's `trajectory_balance_terms` with the group
estimate of log Z and the raw reward, AdamW, a linearly decaying or constant learning rate, optional clipping of the
global gradient norm as the Trainer's `max_grad_norm`), and records the pre-clipping gradient norm of every step. Arms
differ in the residual's normalisation (`sum`: exact trajectory balance; `length`: the same residual divided by the
completion length), in gradient clipping and, as a diagnostic, in Adam's β2. Every arm runs at several learning rates
and seeds; the table gives the final total variation (TV) to the target, per seed.

`--long` measures instead the gradient norm of one step at completion lengths of 1k to 8k tokens (random completions
of a tiny model whose policy differs from its reference by a small perturbation), for both normalisations.

The README's results came from (each about 15 minutes on one thread, beside other jobs):

    python benchmarks/bench_matching_toy.py                     # 6 arms x 3 rates, 200 steps, linear decay
    python benchmarks/bench_matching_toy.py --schedule constant --steps 500 --betas 15,5 --lrs 5e-4,1e-3 --arms 0,1
    python benchmarks/bench_matching_toy.py --schedule constant --steps 1000 --lrs 5e-4 --arms 0,1
    python benchmarks/bench_matching_toy.py --long              # gradient norms at 1k-8k tokens

`--smoke` checks that it runs. Writes `matching_toy_<schedule>_<steps>steps.json` (and `.png`) or
`matching_toy_long.json` to `--output-dir` (default `benchmarks/results`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a source checkout: use its trl_flowrl
    sys.path.insert(0, str(REPO))

from reporting import machine  # noqa: E402

from trl_flowrl.flowrl.objective import trajectory_balance_terms  # noqa: E402


NUM_CONTENT = 8
EOS, BOS = NUM_CONTENT, NUM_CONTENT + 1
VOCAB = NUM_CONTENT + 2
NUM_VALID = 16


@dataclass(frozen=True)
class Arm:
    """A way of optimising the matching residual: its normalisation, `max_grad_norm` (None: no clipping), Adam's β2."""

    normalization: str
    max_grad_norm: float | None = 1.0
    adam_beta2: float = 0.999

    @property
    def name(self) -> str:
        clip = "no clip" if self.max_grad_norm is None else f"clip {self.max_grad_norm:.3g}"
        beta2 = "" if self.adam_beta2 == 0.999 else f", Adam beta2 {self.adam_beta2:g}"
        return f"{self.normalization}, {clip}{beta2}"


ARMS = [
    Arm("length"),  # the matching preset before this benchmark
    Arm("sum"),
    Arm("length", max_grad_norm=None),
    Arm("sum", max_grad_norm=None),
    # the hypothesis: with clipping, "sum"'s steps are normalised; "length"'s gradients are ~1/n^2 smaller, stay below
    # the threshold and shrink as the policy converges while Adam's second moment remembers the larger early ones
    Arm("length", max_grad_norm=1.0 / 81),
    Arm("length", adam_beta2=0.99),
]


def build_model(seed: int, hidden: int = 32, layers: int = 2, max_positions: int = 32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


class Toy:
    """The valid answers, the reference model and the exact distance to the target."""

    def __init__(self, lengths: str, seed: int = 0, pretrain_steps: int = 1500, valid_mass: float = 0.35):
        generator = torch.Generator().manual_seed(seed)
        self.max_length = 12 if lengths == "unequal" else 9  # content tokens; the end token comes on top
        answers: set[tuple[int, ...]] = set()
        while len(answers) < NUM_VALID:
            n = 9 if lengths == "equal" else int(torch.randint(3, 13, (1,), generator=generator))
            answers.add(tuple(torch.randint(0, NUM_CONTENT, (n,), generator=generator).tolist()))
        self.answers = sorted(answers, key=lambda a: (len(a), a))
        order = torch.randperm(NUM_VALID, generator=generator).tolist()
        weights = torch.tensor([1.0 / (1 + order[k]) for k in range(NUM_VALID)])
        self.data_weights = valid_mass * weights / weights.sum()
        self.valid_mass = valid_mass
        self.reference = self._pretrain(seed, pretrain_steps, generator)

    def _sample_data(self, n: int, generator) -> list[tuple[int, ...]]:
        rows = []
        for _ in range(n):
            if float(torch.rand((), generator=generator)) < self.valid_mass:
                k = int(torch.multinomial(self.data_weights, 1, generator=generator))
                rows.append(self.answers[k])
            else:
                length = int(torch.randint(1, self.max_length + 1, (1,), generator=generator))
                rows.append(tuple(torch.randint(0, NUM_CONTENT, (length,), generator=generator).tolist()))
        return rows

    def _pretrain(self, seed, steps, generator):
        model = build_model(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(steps):
            ids, mask = pack(self._sample_data(64, generator), self.max_length + 1)
            logps = sequence_token_logps(model, ids)
            loss = -(logps * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def valid_logps(self, model) -> torch.Tensor:
        """(16,) exact log π(answer, end) of every valid answer."""
        with torch.no_grad():
            ids, mask = pack(self.answers, self.max_length + 1)
            return (sequence_token_logps(model, ids) * mask).sum(-1)

    def distance(self, model, beta: float) -> dict:
        """Exact distance of `model` to p* over 17 outcomes: the 16 answers and "anything else"."""
        log_ref = self.valid_logps(self.reference).double()
        log_pi = self.valid_logps(model).double()
        ref_valid = log_ref.exp().sum()
        log_norm = torch.logsumexp(torch.cat([log_ref + beta, torch.log1p(-ref_valid).reshape(1)]), 0)
        target = torch.cat([(log_ref + beta - log_norm).exp(), (torch.log1p(-ref_valid) - log_norm).exp().reshape(1)])
        policy_valid = log_pi.exp()
        policy = torch.cat([policy_valid, (1 - policy_valid.sum()).clamp(min=0).reshape(1)])
        among_target = log_ref.exp() / ref_valid
        among_policy = policy_valid / policy_valid.sum()
        return {
            "tv": 0.5 * float((policy - target).abs().sum()),
            "tv_among_valid": 0.5 * float((among_policy - among_target).abs().sum()),
            "valid_mass": float(policy_valid.sum()),
            "target_valid_mass": float(target[:-1].sum()),
        }


def pack(rows, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS] + tokens + [EOS], padded with EOS: (N, width + 1) ids and the (N, width) mask of the counted tokens."""
    ids = torch.full((len(rows), width + 1), EOS, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    ids[:, 0] = BOS
    for i, row in enumerate(rows):
        ids[i, 1 : len(row) + 1] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row) + 1] = 1.0  # the tokens and the end token
    return ids, mask


def sequence_token_logps(model, ids: torch.Tensor) -> torch.Tensor:
    """(N, T-1) log π(ids[:, t+1] | ids[:, :t+1])."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def sample(model, n: int, max_tokens: int, generator) -> list[tuple[int, ...]]:
    """`n` completions at temperature 1; a completion that writes no end token within `max_tokens` is truncated."""
    ids = torch.full((n, 1), BOS, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_tokens):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, EOS), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == EOS
        if bool(done.all()):
            break
    rows = []
    for row in ids[:, 1:].tolist():
        rows.append(tuple(row[: row.index(EOS)]) if EOS in row else (*row, None))  # None marks a truncation
    return rows


def train(
    toy: Toy,
    arm: Arm,
    beta: float,
    lr: float,
    seed: int,
    steps: int,
    groups: int = 4,
    group_size: int = 16,
    schedule: str = "linear",
):
    """One run; returns the final exact distance, and the pre-clipping gradient norm of every step. `schedule`:
    "linear" (the Trainer's default, decaying to 0) or "constant" (the embedded recipes')."""
    policy = copy.deepcopy(toy.reference).train()
    for p in policy.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, arm.adam_beta2), weight_decay=0.0)
    decay = (lambda step: 1.0 - step / steps) if schedule == "linear" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    generator = torch.Generator().manual_seed(seed)
    answers = set(toy.answers)
    width = toy.max_length + 1
    grad_norms, tv_curve = [], []
    for step in range(steps):
        rows = sample(policy, groups * group_size, width, generator)
        truncated = torch.tensor([row[-1:] == (None,) for row in rows])
        rows = [row[:-1] if row[-1:] == (None,) else row for row in rows]
        rewards = torch.tensor([float(row in answers and not t) for row, t in zip(rows, truncated.tolist())])
        ids, mask = pack(rows, width)
        mask[truncated, -1] = 1.0  # a truncated completion has `width` tokens and no end token
        with torch.no_grad():
            ref = sequence_token_logps(toy.reference, ids)
        terms = trajectory_balance_terms(
            log_z=None,
            per_token_logps=sequence_token_logps(policy, ids),
            ref_per_token_logps=ref,
            old_per_token_logps=None,
            advantages=rewards,
            completion_mask=mask,
            beta=beta,
            normalization=arm.normalization,
            group_index=torch.arange(groups).repeat_interleave(group_size),
        )
        optimizer.zero_grad()
        terms.loss.backward()
        clip = arm.max_grad_norm if arm.max_grad_norm is not None else float("inf")
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)))
        optimizer.step()
        scheduler.step()
        if (step + 1) % 25 == 0 or step == 0:
            tv_curve.append((step + 1, toy.distance(policy, beta)["tv"]))
    return {"final": toy.distance(policy, beta), "grad_norms": grad_norms, "tv_curve": tv_curve}


def long_completion_gradients(lengths=(1024, 2048, 4096, 8192), group: int = 4, seed: int = 0) -> list[dict]:
    """Pre-clipping gradient norm of one matching step at long completion lengths, for `sum` and `length`."""
    results = []
    reference = build_model(seed, hidden=64, layers=2, max_positions=max(lengths) + 1)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy some way from its reference, as after a little training
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.tensor([1.0, 0.0] * (group // 2))
    for n in lengths:
        ids = torch.cat(
            [torch.full((group, 1), BOS), torch.randint(0, NUM_CONTENT, (group, n), generator=generator)], dim=1
        )
        with torch.no_grad():
            ref = sequence_token_logps(reference, ids)
        row = {"tokens": n}
        for normalization in ("sum", "length"):
            policy.zero_grad()
            logps = sequence_token_logps(policy, ids)
            terms = trajectory_balance_terms(
                log_z=None,
                per_token_logps=logps,
                ref_per_token_logps=ref,
                old_per_token_logps=None,
                advantages=rewards,
                completion_mask=torch.ones(group, n),
                beta=15.0,
                normalization=normalization,
                group_index=torch.zeros(group, dtype=torch.long),
            )
            terms.loss.backward()
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in policy.parameters()]))
            row[normalization] = {
                "grad_norm": float(norm),
                "residual_abs_max": float(terms.residual.abs().max()),
                "logp_gap_abs_mean": float(terms.logp_gap.abs().mean()),
            }
        results.append(row)
        print(
            f"  {n:5d} tokens: grad norm sum {row['sum']['grad_norm']:.3g} (|residual| max "
            f"{row['sum']['residual_abs_max']:.3g}), length {row['length']['grad_norm']:.3g} "
            f"(|residual| max {row['length']['residual_abs_max']:.3g})",
            flush=True,
        )
    return results


def summary(report: dict) -> list[dict]:
    """One row per (lengths, beta, arm, lr): the final TV per seed and its mean."""
    rows: dict[tuple, dict] = {}
    for run in report["runs"]:
        key = (run["lengths"], run["beta"], run["arm_name"], run["lr"])
        rows.setdefault(key, {"lengths": key[0], "beta": key[1], "arm": key[2], "lr": key[3], "tv": []})
        rows[key]["tv"].append(run["tv"])
    for row in rows.values():
        row["tv_mean"] = sum(row["tv"]) / len(row["tv"])
    return list(rows.values())


def plot(report: dict, path: Path) -> None:
    """Final TV to the target against the learning rate: one panel per toy variant and beta, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(report)
    panels = sorted({(r["lengths"], r["beta"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (lengths, beta) in zip(axes[0], panels):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            mine = sorted((r for r in rows if (r["lengths"], r["beta"], r["arm"]) == (lengths, beta, arm)),
                          key=lambda r: r["lr"])  # fmt: skip
            if not mine:
                continue
            (line,) = ax.plot([r["lr"] for r in mine], [r["tv_mean"] for r in mine], marker="o", label=arm)
            for r in mine:
                ax.scatter([r["lr"]] * len(r["tv"]), r["tv"], color=line.get_color(), s=8, alpha=0.5)
        ax.set_xscale("log")
        rates = sorted({r["lr"] for r in rows})
        ax.set_xticks(rates, [f"{lr:g}" for lr in rates])
        ax.minorticks_off()
        ax.set_xlabel("learning rate")
        ax.set_ylabel("total variation to p* at the end")
        ax.set_title(f"{lengths} lengths, beta {beta:g}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    s = report["settings"]
    fig.suptitle(f"Enumerable toy: {s['steps']} steps, {s['schedule']} learning rate, 3 seeds (dots)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="equal,unequal", help="toy variants: equal, unequal or both")
    parser.add_argument("--betas", default="15")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--schedule", choices=("linear", "constant"), default="linear", help="learning-rate schedule")
    parser.add_argument("--arms", default=",".join(str(i) for i in range(len(ARMS))), help="indices into ARMS")
    parser.add_argument("--long", action="store_true", help="gradient norms at 1k-8k tokens instead")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    if args.long:
        lengths = (64, 128) if args.smoke else (1024, 2048, 4096, 8192)
        report = {"benchmark": "matching_toy_long", "date": time.strftime("%Y-%m-%d"), "machine": machine()}
        report["rows"] = long_completion_gradients(lengths)
        (output / "matching_toy_long.json").write_text(json.dumps(report, indent=1))
        return report

    if args.smoke:
        args.lengths, args.betas, args.lrs, args.seeds, args.steps, args.arms = "equal", "15", "5e-3", "0", 2, "0,1"
    variants = args.lengths.split(",")
    betas = [float(b) for b in args.betas.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [ARMS[int(i)] for i in args.arms.split(",")]
    report = {
        "benchmark": "matching_toy",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "steps": args.steps,
            "schedule": args.schedule,
            "arms": [asdict(a) for a in arms],
            "groups": 4,
            "group_size": 16,
            "betas": betas,
            "lrs": lrs,
            "seeds": seeds,
        },
        "runs": [],
    }
    start = time.perf_counter()
    for variant in variants:
        toy = Toy(variant, pretrain_steps=2 if args.smoke else 1500)
        ref = toy.distance(toy.reference, 15.0)
        report.setdefault("toys", {})[variant] = {
            "answer_lengths": [len(a) for a in toy.answers],
            "reference_valid_mass": ref["valid_mass"],
            "reference_answer_probs": toy.valid_logps(toy.reference).exp().tolist(),
        }
        print(f"{variant} lengths: the reference writes a valid answer with probability {ref['valid_mass']:.3f}")
        for beta, arm, lr in itertools.product(betas, arms, lrs):
            finals = []
            for seed in seeds:
                run = train(toy, arm, beta, lr, seed, args.steps, schedule=args.schedule)
                norms = run["grad_norms"]
                clip = arm.max_grad_norm
                report["runs"].append(
                    {
                        "lengths": variant,
                        "beta": beta,
                        "arm": asdict(arm),
                        "arm_name": arm.name,
                        "lr": lr,
                        "seed": seed,
                        **run["final"],
                        "tv_curve": run["tv_curve"],
                        "grad_norm_first10": sum(norms[:10]) / min(10, len(norms)),
                        "grad_norm_last10": sum(norms[-10:]) / min(10, len(norms)),
                        "clipped_fraction": 0.0 if clip is None else sum(n > clip for n in norms) / len(norms),
                    }
                )
                finals.append(run["final"]["tv"])
            print(
                f"  beta {beta:g}, {arm.name:30s} lr {lr:g}: TV {sum(finals) / len(finals):.3f} "
                f"({', '.join(f'{v:.3f}' for v in finals)}); grad norm first/last 10 steps "
                f"{report['runs'][-1]['grad_norm_first10']:.3g}/{report['runs'][-1]['grad_norm_last10']:.3g}, "
                f"clipped {report['runs'][-1]['clipped_fraction']:.0%}  [{time.perf_counter() - start:.0f} s]",
                flush=True,
            )
    name = "matching_toy_smoke.json" if args.smoke else f"matching_toy_{args.schedule}_{args.steps}steps.json"
    (output / name).write_text(json.dumps(report, indent=1))
    plot(report, (output / name).with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
