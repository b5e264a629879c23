"""`sage-opd prepare` end to end at a tiny size: artifacts, cache, a teacher the service serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from client.teacher import TeacherClient
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings
from trainer.cli import app
from trainer.config import DataConfig, LlamaShape, PrepareConfig, SFTConfig, load_config

TINY = PrepareConfig(
    vocab_size=600,
    thoughts=True,
    teacher=LlamaShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
    student=LlamaShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
    data=DataConfig(
        expert_tasks=6,
        recovery_tasks=4,
        judge_tasks=6,
        student_tasks=3,
        dagger_rounds=2,
        dagger_tasks=2,
        student_dagger_rounds=1,
    ),
    teacher_sft=SFTConfig(epochs=1, warmup_steps=1),
    student_sft=SFTConfig(epochs=1, warmup_steps=1),
    eval_tasks=3,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from services.http import running_server

    out = tmp_path_factory.mktemp("artifacts")
    overrides = [f"{k}={v}" for k, v in flatten(TINY.model_dump(mode="json")).items()]
    args = ["prepare", "--out", str(out)] + [x for o in overrides for x in ("--set", o)]
    with running_server(create_env_app(EnvSettings())) as env_url:
        first = CliRunner().invoke(app, [*args, "--env-url", env_url])
        second = CliRunner().invoke(app, [*args, "--env-url", env_url])
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    return Path(first.output.split("artifacts: ")[1].split(" ")[0]), first.output + second.output


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = "null" if value is None else value
    return out


def test_prepare_writes_the_teacher_the_student_the_data_and_a_summary(prepared) -> None:
    folder, output = prepared
    summary = json.loads((folder / "summary.json").read_text())
    for name in ("teacher", "student-init"):
        assert (folder / name / "config.json").exists() and (
            folder / name / "tokenizer.json"
        ).exists()
        agent = json.loads((folder / name / "agent.json").read_text())
        assert agent["history"] == 1 and agent["thoughts"] is True
    assert {"expert.jsonl", "recovery.jsonl", "judge.jsonl", "dagger.jsonl"} <= {
        p.name for p in (folder / "data").iterdir()
    }
    # The student warms up on the first student_tasks expert and recovery episodes
    # (1-turn windows: one example per turn).
    warm = [
        json.loads(line)
        for name in ("expert", "recovery")
        for line in (folder / "data" / f"{name}.jsonl").read_text().splitlines()[:3]
    ]
    assert summary["student"]["examples"] == sum(len(t["steps"]) for t in warm)
    # Two DAgger rounds of two tasks each: the first four expert and recovery tasks; then
    # the student plays the next two, in charge of every step.
    dagger = [json.loads(x) for x in (folder / "data" / "dagger.jsonl").read_text().splitlines()]
    assert [t["task_id"] for t in dagger] == [0, 1, 2, 3]
    lines = (folder / "data" / "student_dagger.jsonl").read_text().splitlines()
    assert [json.loads(x)["task_id"] for x in lines] == [4, 5]
    student_steps = [s for x in lines for s in json.loads(x)["steps"]]
    assert all(s["expert_action"] is not None for s in student_steps)
    # The expert's searches carry their thoughts, in its own and in the teacher's episodes.
    expert = [json.loads(x) for x in (folder / "data" / "expert.jsonl").read_text().splitlines()]
    for episodes in (expert, dagger):
        thoughts = [s["thought"] for t in episodes for s in t["steps"] if s["thought"]]
        assert any(t.endswith(" not here") for t in thoughts)
        assert any(not t.endswith(" not here") for t in thoughts)
    assert summary["dagger"]["dagger"]["episodes"] == 4 and summary["dagger"]["steps"] >= 3
    assert summary["dagger"]["student_dagger"]["episodes"] == 2
    assert "dagger_s" in summary["timings"] and "DAgger, teacher playing: 4 episodes" in output
    assert "DAgger, student playing: 2 episodes" in output
    assert 0.0 <= summary["teacher"]["valid_unseen"]["success"] <= 1.0
    assert 0.0 <= summary["judge"]["agreement"] <= 1.0
    assert "judge agreement on held-out examples" in output
    # Three expert episodes of valid_unseen, every turn scored, in 1-turn windows.
    forced = summary["student"]["valid_unseen_forced"]
    assert forced["split"] == "valid_unseen" and forced["turns"] >= 3
    assert "go" in forced["by_verb"]  # every episode starts by walking somewhere
    assert "valid_unseen, teacher-forced on the expert's episodes" in output


def test_a_second_prepare_with_the_same_config_reuses_the_cache(prepared) -> None:
    folder, output = prepared
    first, second = output.split("artifacts: ")[1:]
    assert first.split(" ")[0] == second.split(" ")[0] == str(folder)
    assert float(second.split("(")[1].split("s this call")[0]) < 10


def test_the_prepared_teacher_serves_scores_in_the_teacher_service(prepared, serve) -> None:
    folder, _ = prepared
    url = serve(create_teacher_app(TeacherSettings(model=str(folder / "teacher"))))

    async def score() -> float:
        async with TeacherClient(url) as teacher:
            answer = await teacher.score([(list(range(5, 30)), [(1, 25)])])
        return answer.sequences[0].spans[0].logprobs[0]

    import asyncio

    assert asyncio.run(score()) < 0
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_eval_prints_success_and_the_teacher_forced_score(prepared, serve, tmp_path: Path) -> None:
    folder, _ = prepared
    url = serve(create_env_app(EnvSettings()))
    args = ["eval", "--model", str(folder / "teacher"), "--limit", "2", "--env-url", url]
    result = CliRunner().invoke(app, [*args, "--teacher-forced"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.strip().splitlines()]  # past progress bars
    assert lines[-2].startswith("valid_unseen: success ") and "over 2 tasks" in lines[-2]
    assert lines[-1].startswith("valid_unseen, teacher-forced on the expert's episodes: ")
    assert "of episodes (go " in lines[-1]
    assert "agent.json" not in result.output

    # A folder without agent.json is evaluated with the default rendering, and says so.
    bare = tmp_path / "bare"
    shutil.copytree(folder / "teacher", bare)
    (bare / "agent.json").unlink()
    result = CliRunner().invoke(
        app, ["eval", "--model", str(bare), "--limit", "1", "--env-url", url]
    )
    assert result.exit_code == 0, result.output
    assert f"note: {bare} has no agent.json" in result.output


def test_config_overrides_are_typed_and_unknown_keys_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("history: 2\ndata:\n  expert_tasks: 5\n")
    config = load_config(PrepareConfig, path, ["data.recovery_noise=0.1", "history=null"])
    assert config.data.expert_tasks == 5 and config.data.recovery_noise == 0.1
    assert config.history is None
    with pytest.raises(ValueError):
        load_config(PrepareConfig, path, ["data.expert_taks=5"])
    assert load_config(PrepareConfig, None).digest() == PrepareConfig().digest()
    # DAgger rounds play expert and recovery tasks: more than there are is refused.
    with pytest.raises(ValueError, match="3 DAgger rounds of 600 tasks need 1800 tasks"):
        load_config(PrepareConfig, path, ["data.dagger_rounds=3", "data.dagger_tasks=600"])


def test_prepare_refuses_more_tasks_than_the_train_split_has_before_gathering(
    tmp_path: Path, serve
) -> None:
    from trainer.prepare import prepare

    url = serve(create_env_app(EnvSettings()))
    greedy = TINY.model_copy(update={"data": DataConfig(expert_tasks=3000, recovery_tasks=600)})
    with pytest.raises(ValueError, match="5100 distinct train tasks .* train split has 3553"):
        prepare(greedy, tmp_path, url, progress=False, evaluate=False)
    assert not any(tmp_path.glob("prepare-*"))  # nothing cached
