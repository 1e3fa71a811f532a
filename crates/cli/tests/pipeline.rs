//! `align run`: a tiny PT → SFT → eval pipeline end to end; skip-if-done; a changed learning rate
//! re-runs that stage and the ones after it only; SIGKILL of the runner mid-stage then a re-run
//! finishes with the same weights as an uninterrupted run; `--from STAGE` re-runs that stage and
//! the later ones and leaves the earlier ones untouched; validation errors name the key path.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

mod support;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn align() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.env("ALIGN_LOG", "warn").env_remove("ALIGN_TEST_STEP_DELAY_MS").env_remove("ALIGN_TEST_CRASH_IN_SAVE");
    c
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "align failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn pipeline(dir: &Path, run_dir: &Path, extra_stage: &str) -> PathBuf {
    let file = dir.join(format!("{}.toml", run_dir.file_name().unwrap().to_string_lossy()));
    let r = repo();
    std::fs::write(
        &file,
        format!(
            r#"[pipeline]
name = "tiny"
run_dir = {run:?}

[defaults]
model = {model:?}
device = "cpu"
seed = 7

[defaults.train]
batch_size = 4
lr = 1e-2
save_every = 2

[[stage]]
name = "pt"
kind = "pretrain"
data = [{pt:?}]
[stage.train]
max_steps = 4
max_length = 32

[[stage]]
name = "sft"
kind = "sft"
from = "pt"
data = [{sft:?}]
[stage.train]
max_steps = 6
max_length = 96

[[stage]]
name = "eval"
kind = "eval"
eval = "perplexity"
from = "sft"
data = [{ppl:?}]
{extra_stage}
"#,
            run = run_dir,
            model = r.join("tests/fixtures/models/tiny-llama"),
            pt = r.join("data/pretrain/medical_corpus.txt"),
            sft = r.join("data/sft/medical_sharegpt.jsonl"),
            ppl = r.join("tests/fixtures/perplexity.txt"),
        ),
    )
    .unwrap();
    file
}

fn record(run: &Path, stage: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join(stage).join("stage.json")).unwrap()).unwrap()
}

fn outcomes(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains(": "))
        .filter(|l| !l.starts_with("run directory"))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn runs_skips_when_done_and_reruns_what_a_change_touches() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let file = pipeline(tmp.path(), &run, "");
    let first = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&first), vec!["pt: ran", "sft: ran", "eval: ran"]);
    for s in ["pt", "sft", "eval"] {
        let r = record(&run, s);
        assert_eq!(r["status"], "done", "{s}");
        assert_eq!(r["config_hash"].as_str().unwrap().len(), 64);
        assert!(r["inputs"][0]["hash"].as_str().is_some() && r["data"][0]["hash"].as_str().is_some());
        assert!(r["started_at"].as_str().unwrap().ends_with('Z') && r["duration_seconds"].as_f64().is_some());
        assert!(r["command"].as_str().unwrap().contains("run"));
    }
    assert!(record(&run, "sft")["summary"]["completed"].as_bool().unwrap());
    // [defaults] device and seed survive a [defaults.train] table
    for s in ["pt", "sft"] {
        assert_eq!(record(&run, s)["config"]["train"]["seed"], 7, "{s}");
        assert_eq!(record(&run, s)["config"]["train"]["device"], "cpu", "{s}");
        assert_eq!(record(&run, s)["config"]["train"]["batch_size"], 4, "{s}");
    }
    assert!(record(&run, "eval")["eval"]["perplexity"].as_f64().unwrap() > 1.0);
    let pipeline_json: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("pipeline.json")).unwrap()).unwrap();
    assert_eq!(pipeline_json["stages"], serde_json::json!(["pt", "sft", "eval"]));

    let again = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(
        outcomes(&again),
        vec!["pt: up to date (skipped)", "sft: up to date (skipped)", "eval: up to date (skipped)"]
    );

    let sft_before = std::fs::read(run.join("sft/final/model.safetensors")).unwrap();
    let changed =
        ok(align().args(["run", file.to_str().unwrap(), "--set", "stage.sft.train.lr=5e-3"]).output().unwrap());
    assert_eq!(outcomes(&changed), vec!["pt: up to date (skipped)", "sft: ran", "eval: ran"]);
    assert_ne!(std::fs::read(run.join("sft/final/model.safetensors")).unwrap(), sft_before);

    let only = ok(align()
        .args(["run", file.to_str().unwrap(), "--only", "eval", "--set", "stage.sft.train.lr=5e-3", "--restart"])
        .output()
        .unwrap());
    assert_eq!(outcomes(&only), vec!["pt: not selected", "sft: not selected", "eval: ran"]);
}

/// `--only STAGE` on a fresh run folder runs that stage alone, although later stages need
/// stages that never ran.
#[test]
fn only_one_stage_of_a_fresh_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let file = pipeline(tmp.path(), &run, "");
    let only = ok(align().args(["run", file.to_str().unwrap(), "--only", "pt"]).output().unwrap());
    assert_eq!(outcomes(&only), vec!["pt: ran", "sft: not selected", "eval: not selected"]);
    assert!(run.join("pt/final/model.safetensors").is_file() && !run.join("sft").exists());
}

/// A stage whose data changed re-runs (and what comes after it); a done stage whose `final/` was
/// deleted re-runs from its last checkpoint to the same weights; an eval stage's own keys are
/// checked as strictly as a training stage's.
#[test]
fn changed_data_or_a_deleted_output_re_runs_the_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let file = pipeline(tmp.path(), &run, "");
    let corpus = tmp.path().join("corpus.txt");
    std::fs::copy(repo().join("data/pretrain/medical_corpus.txt"), &corpus).unwrap();
    let original = format!("{:?}", repo().join("data/pretrain/medical_corpus.txt"));
    let text = std::fs::read_to_string(&file).unwrap().replace(&original, &format!("{corpus:?}"));
    std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap();
    ok(align().args(["run", f]).output().unwrap());

    std::fs::write(&corpus, std::fs::read_to_string(&corpus).unwrap() + "\nA new paragraph of the corpus.\n").unwrap();
    let changed = ok(align().args(["run", f]).output().unwrap());
    assert_eq!(outcomes(&changed), vec!["pt: ran", "sft: ran", "eval: ran"]);

    let sft_before = std::fs::read(run.join("sft/final/model.safetensors")).unwrap();
    std::fs::remove_dir_all(run.join("sft/final")).unwrap();
    let repaired = ok(align().args(["run", f]).output().unwrap());
    assert_eq!(outcomes(&repaired), vec!["pt: up to date (skipped)", "sft: ran", "eval: ran"]);
    assert!(std::fs::read(run.join("sft/final/model.safetensors")).unwrap() == sft_before, "the same weights again");

    for (set, key) in [("stage.eval.train.batchsize=4", "batchsize"), ("stage.eval.max_new_token=3", "max_new_token")] {
        let out = align().args(["run", f, "--set", set]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(key) && err.contains("stage[2]"), "{set}: {err}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the test hooks: --features align-cli/fault-injection (scripts/test.sh sets it)"
)]
fn killed_runner_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let file = pipeline(tmp.path(), &straight, "");
    ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());

    let killed = tmp.path().join("killed");
    let file = pipeline(tmp.path(), &killed, "");
    let mut child =
        align().args(["run", file.to_str().unwrap()]).env("ALIGN_TEST_STEP_DELAY_MS", "150").spawn().unwrap();
    let started = Instant::now();
    while !killed.join("sft/checkpoint-2/COMPLETE").is_file() {
        assert!(started.elapsed() < Duration::from_secs(180), "sft checkpoint-2 never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(record(&killed, "sft")["status"], "running");
    let resumed = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&resumed), vec!["pt: up to date (skipped)", "sft: ran", "eval: ran"]);
    for s in ["pt", "sft"] {
        let a = std::fs::read(straight.join(s).join("final/model.safetensors")).unwrap();
        let b = std::fs::read(killed.join(s).join("final/model.safetensors")).unwrap();
        assert!(a == b, "{s}: final weights differ after kill + resume");
    }
}

/// Every file under `dir` (relative path) with its bytes and modification time.
fn files_with_mtimes(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), (std::fs::read(&p).unwrap(), mtime));
            }
        }
    }
    out
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// `--from STAGE --restart` re-runs that stage and the ones after it, from scratch, to the same
/// weights and perplexity as the first time (a run compared with itself), and leaves every file
/// of the earlier stage as it was (bytes and modification times). Without `--restart` the
/// selected stages run only where they are out of date, and an earlier stage is used as it is
/// even when its config has changed.
#[test]
fn from_stage_reruns_it_and_the_later_ones_and_leaves_the_earlier_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("from");
    let file = pipeline(tmp.path(), &run, "");
    let f = file.to_str().unwrap();
    ok(align().args(["run", f]).output().unwrap());
    let pt = files_with_mtimes(&run.join("pt"));
    assert!(pt.contains_key(Path::new("final/model.safetensors")) && pt.contains_key(Path::new("stage.json")));
    let sft_final = run.join("sft/final/model.safetensors");
    let (sft_weights, sft_written) = (std::fs::read(&sft_final).unwrap(), mtime(&sft_final));
    let (sft_record, eval_record) = (mtime(&run.join("sft/stage.json")), mtime(&run.join("eval/stage.json")));
    let ppl = record(&run, "eval")["eval"]["perplexity"].as_f64().unwrap();

    let rerun = ok(align().args(["run", f, "--from", "sft", "--restart"]).output().unwrap());
    assert_eq!(outcomes(&rerun), vec!["pt: not selected", "sft: ran", "eval: ran"]);
    assert!(files_with_mtimes(&run.join("pt")) == pt, "--from sft touched the files of pt");
    assert_ne!(mtime(&sft_final), sft_written, "sft/final was not written again");
    assert!(std::fs::read(&sft_final).unwrap() == sft_weights, "sft re-ran from the same input to other weights");
    assert_ne!(mtime(&run.join("sft/stage.json")), sft_record);
    assert_ne!(mtime(&run.join("eval/stage.json")), eval_record);
    assert_eq!(record(&run, "eval")["eval"]["perplexity"].as_f64().unwrap(), ppl);
    for s in ["sft", "eval"] {
        assert_eq!(record(&run, s)["status"], "done", "{s}");
    }

    let again = ok(align().args(["run", f, "--from", "sft"]).output().unwrap());
    assert_eq!(outcomes(&again), vec!["pt: not selected", "sft: up to date (skipped)", "eval: up to date (skipped)"]);
    let changed_pt = ok(align().args(["run", f, "--from", "sft", "--set", "stage.pt.train.lr=5e-3"]).output().unwrap());
    assert_eq!(
        outcomes(&changed_pt),
        vec!["pt: not selected", "sft: up to date (skipped)", "eval: up to date (skipped)"]
    );
    assert!(files_with_mtimes(&run.join("pt")) == pt, "an unselected stage was touched");
}

#[test]
fn validation_errors_name_the_key_path() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("v");
    let base = pipeline(tmp.path(), &run, "");
    let text = std::fs::read_to_string(&base).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (text.replace("max_steps = 6", "max_stepz = 6"), "stage[1] (sft)"),
        (text.replace("medical_sharegpt.jsonl", "missing.jsonl"), "stage[1].data"),
        (text.replace("from = \"pt\"", "from = \"nope\""), "stage[1].from: unknown stage 'nope'"),
        (text.replace("from = \"pt\"", "from = \"eval\""), "stage[1].from: 'eval' is this stage or a later one"),
        (
            format!(
                "{text}\n[[stage]]\nname = \"rl\"\nkind = \"ppo\"\nfrom = \"sft\"\ndata = [{:?}]\n",
                repo().join("data/prompts/medical_prompts.jsonl")
            ),
            "stage[3].reward_model",
        ),
        (
            format!(
                "{text}\n[[stage]]\nname = \"dpo\"\nkind = \"dpo\"\nfrom = \"sft\"\ndata = [{:?}]\n",
                repo().join("data/sft/medical_sharegpt.jsonl")
            ),
            "stage[3].data: a dpo stage needs preference data",
        ),
        (
            format!(
                "{text}\n[[stage]]\nname = \"rm\"\nkind = \"reward\"\nfrom = \"sft\"\ndata = [{pairs:?}]\n[[stage]]\nname = \"rl\"\nkind = \"ppo\"\nfrom = \"sft\"\nreward_model = \"rm\"\ndata = [{:?}]\n",
                repo().join("data/pretrain/medical_notes.jsonl"),
                pairs = repo().join("data/preference/medical_pairs.jsonl")
            ),
            "stage[4].data: a ppo stage needs prompt data",
        ),
        (
            format!(
                "{text}\n[[stage]]\nname = \"rm\"\nkind = \"reward\"\nfrom = \"sft\"\ndata = [{pairs:?}]\n[[stage]]\nname = \"rl\"\nkind = \"ppo\"\nfrom = \"sft\"\nreward_model = \"rm\"\ndata = [{:?}]\n[stage.ppo]\ncliprange = -1.0\n",
                repo().join("data/prompts/medical_qa.jsonl"),
                pairs = repo().join("data/preference/medical_pairs.jsonl")
            ),
            "stage[4] (rl): [ppo] cliprange",
        ),
        (text.replace("kind = \"sft\"", "kind = \"rlhf\""), "stage[1].kind"),
        (
            text.replace("max_length = 96\n", "max_length = 96\n[stage.lora]\nr = 4\n"),
            r#"[lora] is set but method = "full"; set method = "lora" (or remove [lora])"#,
        ),
        (text.replace("[defaults]", "[defaults]\ncolor = 1"), "stage[0] (pt)"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let f = tmp.path().join(format!("bad{i}.toml"));
        std::fs::write(&f, body).unwrap();
        let out = align().args(["run", f.to_str().unwrap()]).output().unwrap();
        assert!(!out.status.success(), "case {i} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        let line =
            err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("case {i}: no error line:\n{err}"));
        assert!(line.contains(want), "case {i}: expected {want:?} in: {line}");
        assert!(!run.exists(), "case {i}: validation must fail before anything runs");
    }
}

#[test]
fn lora_stages_chain_and_full_models_are_merged_where_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("lora");
    let r = repo();
    let file = tmp.path().join("lora.toml");
    std::fs::write(&file, support::lora_chain_pipeline(&run, 4, "", "")).unwrap();
    let out = ok(align().args(["run", file.to_str().unwrap(), "--check"]).output().unwrap());
    let _ = out;
    ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    // the SFT adapter was merged once into a full model, used by the RM and as DPO's reference
    assert!(run.join("sft/final/adapter_config.json").is_file());
    assert!(run.join("sft/merged/model.safetensors").is_file());
    let rm = record(&run, "rm");
    assert_eq!(rm["inputs"][0]["path"].as_str().unwrap(), run.join("sft/merged").display().to_string());
    // the LoRA reward model is a PEFT SEQ_CLS adapter on that merged model, usable as it is
    let rm_adapter: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("rm/final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(rm_adapter["task_type"], "SEQ_CLS");
    assert_eq!(rm_adapter["base_model_name_or_path"].as_str().unwrap(), run.join("sft/merged").display().to_string());
    let eval = align()
        .args(["eval", "reward", "--model", run.join("rm/final").to_str().unwrap(), "--device", "cpu", "--json"])
        .arg("--data")
        .arg(r.join("data/preference/medical_pairs_eval.jsonl"))
        .output()
        .unwrap();
    ok(eval.clone());
    let stats: Value = serde_json::from_str(String::from_utf8_lossy(&eval.stdout).trim()).unwrap();
    assert_eq!(stats["pairs"], 50);
    let dpo = record(&run, "dpo");
    assert_eq!(dpo["config"]["adapter"].as_str().unwrap(), run.join("sft/final").display().to_string());
    assert!(run.join("dpo/final/adapter_config.json").is_file());
    assert_eq!(record(&run, "ppl")["status"], "done");
}

/// PT-less chain SFT → RM → PPO, then the same file with the "rlhf" stage switched to DPO (kind
/// and data) and to GRPO (kind and section): SFT and RM are skipped, only "rlhf" re-runs.
#[test]
fn ppo_stage_runs_in_a_pipeline_and_swaps_to_dpo_in_one_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("rl");
    let r = repo();
    let body = |kind: &str, data: &Path, section: &str| {
        let pairs = r.join("data/preference/medical_pairs.jsonl");
        rl_pipeline(
            &run,
            &format!(
                "[[stage]]\nname = \"rm\"\nkind = \"reward\"\nfrom = \"sft\"\ndata = [{pairs:?}]\n[[stage]]\nname = \"rlhf\"\nkind = \"{kind}\"\nfrom = \"sft\"\ndata = [{data:?}]\n{section}\n"
            ),
        )
    };
    let ppo = tmp.path().join("ppo.toml");
    let prompts = r.join("data/prompts/medical_qa.jsonl");
    std::fs::write(
        &ppo,
        body(
            "ppo",
            &prompts,
            "reward_model = \"rm\"\n[stage.ppo]\nrollout_batch_size = 4\nmax_new_tokens = 8\nppo_epochs = 1",
        ),
    )
    .unwrap();
    let first = ok(align().args(["run", ppo.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&first), vec!["sft: ran", "rm: ran", "rlhf: ran"]);
    let rec = record(&run, "rlhf");
    assert_eq!(rec["kind"], "ppo");
    assert_eq!(rec["status"], "done");
    let roles: Vec<&str> = rec["inputs"].as_array().unwrap().iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(roles, vec!["model", "reward_model"]);
    assert_eq!(rec["summary"]["steps"], 3);
    assert!(run.join("rlhf/final/value_model/model.safetensors").is_file());
    assert_eq!(std::fs::read_to_string(run.join("rlhf/metrics.jsonl")).unwrap().lines().count(), 3);

    let dpo = tmp.path().join("dpo.toml");
    std::fs::write(&dpo, body("dpo", &r.join("data/preference/medical_pairs.jsonl"), "")).unwrap();
    let swapped = ok(align().args(["run", dpo.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&swapped), vec!["sft: up to date (skipped)", "rm: up to date (skipped)", "rlhf: ran"]);
    assert_eq!(record(&run, "rlhf")["kind"], "dpo");
    assert!(!run.join("rlhf/samples.jsonl").exists(), "the PPO run's files were cleared");

    // and to GRPO, scored by the same reward stage plus a rule
    let grpo = tmp.path().join("grpo.toml");
    let section = "reward_model = \"rm\"\n[stage.grpo]\nnum_generations = 2\ngeneration_batch_size = 4\nmax_completion_length = 8\n[[stage.grpo.rewards]]\ntype = \"length\"\nmin = 4";
    std::fs::write(&grpo, body("grpo", &prompts, section)).unwrap();
    let swapped = ok(align().args(["run", grpo.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&swapped), vec!["sft: up to date (skipped)", "rm: up to date (skipped)", "rlhf: ran"]);
    let rec = record(&run, "rlhf");
    assert_eq!((rec["kind"].as_str(), rec["status"].as_str()), (Some("grpo"), Some("done")));
    let roles: Vec<&str> = rec["inputs"].as_array().unwrap().iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(roles, vec!["model", "reward_model"]);
    let metrics = std::fs::read_to_string(run.join("rlhf/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    assert!(metrics.contains("\"rewards/reward_model/mean\"") && metrics.contains("\"rewards/length/mean\""));
}

/// A prompt-tuning reward stage (virtual tokens and head, a PEFT `SEQ_CLS` folder) scores a PPO
/// stage's rollouts as it is — nothing to merge — with the critic from the policy; the default
/// critic (the reward model) is refused with the key to set.
#[test]
fn a_prompt_tuning_reward_stage_scores_ppo_unmerged() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("rl");
    let r = repo();
    let body = |critic: &str| {
        rl_pipeline(
            &run,
            &format!(
                "[[stage]]\nname = \"rm\"\nkind = \"reward\"\nfrom = \"sft\"\nmethod = \"prompt_tuning\"\ndata = [{pairs:?}]\n[stage.train]\nmax_length = 200\n[stage.prompt_tuning]\nnum_virtual_tokens = 4\n[[stage]]\nname = \"rlhf\"\nkind = \"ppo\"\nfrom = \"sft\"\nreward_model = \"rm\"\ndata = [{prompts:?}]\n[stage.ppo]\nrollout_batch_size = 4\nmax_new_tokens = 8\nppo_epochs = 1\n{critic}",
                pairs = r.join("data/preference/medical_pairs.jsonl"),
                prompts = r.join("data/prompts/medical_qa.jsonl"),
            ),
        )
    };
    let file = tmp.path().join("ppo.toml");
    std::fs::write(&file, body("")).unwrap();
    let out = align().args(["run", file.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("value_model = \"policy\""), "{err}");
    std::fs::write(&file, body("value_model = \"policy\"\n")).unwrap();
    let done = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&done).last().map(String::as_str), Some("rlhf: ran"), "{:?}", outcomes(&done));
    let rm: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("rm/final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((rm["peft_type"].as_str(), rm["task_type"].as_str()), (Some("PROMPT_TUNING"), Some("SEQ_CLS")));
    assert!(!run.join("rm/merged").exists(), "virtual tokens are not merged");
    let rec = record(&run, "rlhf");
    assert_eq!(rec["status"], "done");
    let input = rec["inputs"].as_array().unwrap().iter().find(|i| i["role"] == "reward_model").unwrap().clone();
    assert_eq!(input["path"].as_str().unwrap(), run.join("rm/final").display().to_string());
    let metrics = std::fs::read_to_string(run.join("rlhf/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    assert!(
        metrics
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["rm/score"].as_f64().is_some_and(f64::is_finite)),
        "{metrics}"
    );
}

/// A small pipeline on the tiny model in `run`: a 3-step SFT stage "sft", then `stages`.
fn rl_pipeline(run: &Path, stages: &str) -> String {
    let r = repo();
    format!(
        r#"[pipeline]
name = "rl"
run_dir = {run:?}
[defaults]
model = {model:?}
device = "cpu"
[defaults.train]
batch_size = 4
lr = 1e-3
max_steps = 3
max_length = 256
[[stage]]
name = "sft"
kind = "sft"
data = [{sft:?}]
{stages}"#,
        model = r.join("tests/fixtures/models/tiny-qwen2"),
        sft = r.join("data/sft/medical_sharegpt.jsonl"),
    )
}

/// A KTO stage runs on the pairs an SFT stage's model starts from, and swapping it for a
/// distillation stage whose teacher is that SFT stage re-runs only that stage; the teacher is
/// recorded as an input.
#[test]
fn kto_and_distill_stages_run_in_a_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("rl");
    let r = repo();
    let body = |stage: &str| rl_pipeline(&run, &format!("[[stage]]\nname = \"rlhf\"\n{stage}\n"));
    let kto = tmp.path().join("kto.toml");
    let pairs = r.join("data/preference/medical_pairs.jsonl");
    std::fs::write(&kto, body(&format!("kind = \"kto\"\nfrom = \"sft\"\ndata = [{pairs:?}]"))).unwrap();
    let first = ok(align().args(["run", kto.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&first), vec!["sft: ran", "rlhf: ran"]);
    let rec = record(&run, "rlhf");
    assert_eq!((rec["kind"].as_str(), rec["status"].as_str()), (Some("kto"), Some("done")));
    assert_eq!(rec["summary"]["steps"], 3);

    let distill = tmp.path().join("distill.toml");
    let sft = r.join("data/sft/medical_sharegpt.jsonl");
    let stage = format!(
        "kind = \"distill\"\nteacher = \"sft\"\ndata = [{sft:?}]\n[stage.distill]\nlmbda = 0.5\nmax_new_tokens = 8"
    );
    std::fs::write(&distill, body(&stage)).unwrap();
    let swapped = ok(align().args(["run", distill.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&swapped), vec!["sft: up to date (skipped)", "rlhf: ran"]);
    let rec = record(&run, "rlhf");
    assert_eq!(rec["kind"], "distill");
    let inputs: Vec<(&str, &str)> = rec["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["role"].as_str().unwrap(), i["path"].as_str().unwrap()))
        .collect();
    assert_eq!(inputs.len(), 2, "{inputs:?}");
    assert_eq!(inputs[1], ("teacher", run.join("sft/final").to_str().unwrap()));
    assert!(run.join("rlhf/final/model.safetensors").is_file());
}

/// The shipped demo and its DPO, KTO, distillation and GRPO twins validate, and differ only in the
/// "rlhf" stage.
#[test]
fn demo_pipelines_validate_and_differ_only_in_the_rlhf_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let r = repo();
    let mut stages = Vec::new();
    let twins = ["medical-demo", "medical-demo-dpo", "medical-demo-kto", "medical-demo-distill", "medical-demo-grpo"];
    for name in twins {
        let text = std::fs::read_to_string(r.join(format!("pipelines/{name}.toml"))).unwrap();
        let text = text.replace("\"runs/demo\"", &format!("{:?}", tmp.path().join(name)));
        let file = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&file, &text).unwrap();
        let out = align().current_dir(&r).args(["run", file.to_str().unwrap(), "--check"]).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let doc: toml::Table = toml::from_str(&text).unwrap();
        stages.push(doc["stage"].as_array().unwrap().clone());
    }
    let names = |s: &[toml::Value]| s.iter().map(|t| t["name"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    for (twin, kind) in [(1, "dpo"), (2, "kto"), (3, "distill"), (4, "grpo")] {
        assert_eq!(names(&stages[0]), names(&stages[twin]), "{}", twins[twin]);
        for (a, b) in stages[0].iter().zip(&stages[twin]) {
            if a["name"].as_str() == Some("rlhf") {
                assert_eq!((a["kind"].as_str(), b["kind"].as_str()), (Some("ppo"), Some(kind)));
            } else {
                assert_eq!(a, b, "stage {} differs between {} and {}", a["name"], twins[0], twins[twin]);
            }
        }
    }
}

/// A reward stage trained with LoRA feeds a PPO stage: the PPO stage reads the adapter merged
/// into a full reward-model folder (`rm/merged`), recorded as its reward-model input.
#[test]
fn a_lora_reward_stage_feeds_ppo_as_a_merged_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("rm-lora");
    let r = repo();
    let file = tmp.path().join("rm-lora.toml");
    std::fs::write(
        &file,
        format!(
            r#"[pipeline]
name = "rm-lora"
run_dir = {run:?}
[defaults]
model = {model:?}
device = "cpu"
[defaults.train]
batch_size = 4
lr = 1e-3
max_steps = 2
max_length = 256
[[stage]]
name = "rm"
kind = "reward"
method = "lora"
data = [{pairs:?}]
[stage.lora]
r = 4
[[stage]]
name = "rlhf"
kind = "ppo"
reward_model = "rm"
data = [{prompts:?}]
[stage.ppo]
rollout_batch_size = 4
max_new_tokens = 8
ppo_epochs = 1
"#,
            model = r.join("tests/fixtures/models/tiny-qwen2"),
            pairs = r.join("data/preference/medical_pairs.jsonl"),
            prompts = r.join("data/prompts/medical_qa.jsonl"),
        ),
    )
    .unwrap();
    ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert!(run.join("rm/final/adapter_config.json").is_file());
    let merged: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("rm/merged/config.json")).unwrap()).unwrap();
    assert_eq!(merged["architectures"][0], "Qwen2ForSequenceClassification");
    let rec = record(&run, "rlhf");
    assert_eq!(rec["status"], "done");
    let merged_path = run.join("rm/merged").display().to_string();
    assert_eq!(rec["inputs"][1]["role"], "reward_model");
    assert_eq!(rec["inputs"][1]["path"].as_str(), Some(merged_path.as_str()));
}

/// A pipeline that starts from nothing: a tokenizer stage trains the BPE, an init stage
/// random-initialises a model with it, pretraining starts from that. Re-running skips all three;
/// changing the tokenizer's data re-runs the tokenizer and every stage after it.
fn from_nothing_pipeline(dir: &Path, run: &Path, corpus: &Path) -> PathBuf {
    let desc = dir.join("tiny-model.toml");
    std::fs::write(
        &desc,
        "model_type = \"llama\"\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\n\
         num_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 128\nseed = 3\n",
    )
    .unwrap();
    let file = dir.join("from-nothing.toml");
    std::fs::write(
        &file,
        format!(
            r#"[pipeline]
name = "from-nothing"
run_dir = {run:?}

[defaults]
tokenizer = "tok"
device = "cpu"
seed = 7

[[stage]]
name = "tok"
kind = "tokenizer"
data = [{corpus:?}]
vocab_size = 320

[[stage]]
name = "init"
kind = "init"
config = {desc:?}

[[stage]]
name = "pt"
kind = "pretrain"
from = "init"
data = [{corpus:?}]
[stage.train]
max_steps = 2
batch_size = 4
lr = 1e-2
max_length = 32
"#
        ),
    )
    .unwrap();
    file
}

#[test]
fn tokenizer_and_init_stages_start_a_pipeline_from_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let corpus = tmp.path().join("corpus.txt");
    let text = std::fs::read_to_string(repo().join("data/pretrain/medical_corpus.txt")).unwrap();
    let head: String = text.lines().take(120).map(|l| format!("{l}\n")).collect();
    std::fs::write(&corpus, &head).unwrap();
    let file = from_nothing_pipeline(tmp.path(), &run, &corpus);
    let first = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&first), vec!["tok: ran", "init: ran", "pt: ran"]);
    assert!(run.join("tok/final/tokenizer.json").is_file() && run.join("tok/final/chat_template.jinja").is_file());
    let tok = record(&run, "tok");
    assert_eq!((tok["kind"].as_str(), tok["status"].as_str()), (Some("tokenizer"), Some("done")));
    assert_eq!(tok["config"]["vocab_size"], 320);
    assert_eq!(tok["data"][0]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(tok["eval"]["texts"], 120);
    let init = record(&run, "init");
    assert_eq!(init["inputs"][1]["role"], "tokenizer");
    assert_eq!(init["inputs"][1]["hash"], tok["output_hash"], "init's tokenizer input is tok's output");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("init/final/config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["hidden_size"].as_i64(), cfg["vocab_size"].as_i64()),
        (Some(64), tok["eval"]["vocab_size"].as_i64())
    );
    assert_eq!(record(&run, "pt")["inputs"][0]["hash"], init["output_hash"]);
    // the same tokenizer as `align tokenizer train` makes from the same file
    let cli_tok = tmp.path().join("cli-tok");
    ok(align()
        .args([
            "tokenizer",
            "train",
            "--vocab-size",
            "320",
            "--out",
            cli_tok.to_str().unwrap(),
            corpus.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read(cli_tok.join("tokenizer.json")).unwrap(),
        std::fs::read(run.join("tok/final/tokenizer.json")).unwrap()
    );

    let again = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(
        outcomes(&again),
        vec!["tok: up to date (skipped)", "init: up to date (skipped)", "pt: up to date (skipped)"]
    );

    let pt_before = std::fs::read(run.join("pt/final/model.safetensors")).unwrap();
    let more: String = text.lines().skip(120).take(60).map(|l| format!("{l}\n")).collect();
    std::fs::write(&corpus, head + &more).unwrap();
    let changed = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&changed), vec!["tok: ran", "init: ran", "pt: ran"]);
    assert_ne!(record(&run, "tok")["output_hash"], tok["output_hash"], "a new tokenizer");
    assert_ne!(std::fs::read(run.join("pt/final/model.safetensors")).unwrap(), pt_before);
}

#[test]
fn tokenizer_and_init_stage_errors_name_the_key_path() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let corpus = repo().join("data/pretrain/medical_corpus.txt");
    let file = from_nothing_pipeline(tmp.path(), &run, &corpus);
    let text = std::fs::read_to_string(&file).unwrap();
    let cases = [
        (text.replace("vocab_size = 320", "vocab_size = 100"), "stage[0].vocab_size"),
        (text.replace("vocab_size = 320", "vocab_size = 320\nvocab = 3"), "stage[0].vocab"),
        (text.replace("tokenizer = \"tok\"", "tokenizer = \"runs/demo/tokenizer\""), "defaults.tokenizer"),
        (text.replace("from = \"init\"", "from = \"tok\""), "stage[2].from"),
        (text.replace("from = \"init\"\n", ""), "stage[2].from"),
        (text.replace("config = ", "config = \"nope.toml\"\n#"), "stage[1].config"),
    ];
    for (bad, key) in cases {
        let f = tmp.path().join("bad.toml");
        std::fs::write(&f, bad).unwrap();
        let out = align().args(["run", f.to_str().unwrap(), "--check"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(key), "expected an error naming {key}, got: {err}");
    }
    assert!(!run.exists(), "validation must not create the run directory");
}

/// The older form still works: `[defaults] init = DESCRIPTION` with `tokenizer = FOLDER` makes
/// RUN_DIR/init and the first stage starts from it without `from`.
#[test]
fn defaults_init_with_a_tokenizer_folder_still_starts_a_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let corpus = repo().join("data/pretrain/medical_corpus.txt");
    let file = from_nothing_pipeline(tmp.path(), &run, &corpus);
    let text = std::fs::read_to_string(&file).unwrap();
    let desc = tmp.path().join("tiny-model.toml");
    let start = text.find("[[stage]]\nname = \"tok\"").unwrap();
    let end = text.find("[[stage]]\nname = \"pt\"").unwrap();
    let legacy = format!("{}{}", &text[..start], &text[end..])
        .replace(
            "tokenizer = \"tok\"",
            &format!("init = {desc:?}\ntokenizer = {:?}", repo().join("tests/fixtures/tokenizer")),
        )
        .replace("from = \"init\"\n", "");
    std::fs::write(&file, legacy).unwrap();
    let first = ok(align().args(["run", file.to_str().unwrap()]).output().unwrap());
    assert_eq!(outcomes(&first), vec!["pt: ran"]);
    assert!(run.join("init/config.json").is_file() && run.join("pt/final/model.safetensors").is_file());
}
