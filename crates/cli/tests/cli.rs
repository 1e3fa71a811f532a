//! End-to-end tests of the `align` binary: tokenizer training, model init, generation, perplexity,
//! hub ids from the local Hugging Face cache, and clear one-line errors for bad inputs.
use std::path::Path;
use std::process::Command;

use align_testkit::python_with;
use serde_json::Value;

mod support;
use support::fixtures;
use support::{fails, ok, s};

const CORPUS: &str = "Fever is a body temperature above 38 degrees Celsius.\n\
Drink fluids and rest when you have a mild cold.\n\
发烧时应多喝水并注意休息。\n\
See a doctor if chest pain spreads to the arm or jaw.\n\
Hypertension often has no symptoms and is found by measuring blood pressure.\n";

#[test]
fn tokenizer_train_init_generate_and_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(20)).unwrap();
    let tok = tmp.path().join("tok");
    ok(&["tokenizer", "train", "--vocab-size", "300", "--out", s(&tok), s(&corpus)]);
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        assert!(tok.join(f).is_file(), "{f} missing");
    }
    let desc = tmp.path().join("model.toml");
    std::fs::write(&desc, "hidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\n").unwrap();
    let m1 = tmp.path().join("m1");
    let m2 = tmp.path().join("m2");
    ok(&["init", "--config", s(&desc), "--tokenizer", s(&tok), "--out", s(&m1), "--seed", "5"]);
    ok(&["init", "--config", s(&desc), "--tokenizer", s(&tok), "--out", s(&m2), "--seed", "5"]);
    let w1 = std::fs::read(m1.join("model.safetensors")).unwrap();
    assert_eq!(w1, std::fs::read(m2.join("model.safetensors")).unwrap(), "init with one seed is deterministic");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(m1.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"].as_i64().unwrap(), 300);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");

    let out =
        ok(&["generate", "--model", s(&m1), "--chat", "--prompt", "What is fever?", "--max-new-tokens", "5", "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompt"], "What is fever?");
    assert!(v["tokens"].as_u64().unwrap() <= 5 && v["tokens"].as_u64().unwrap() >= 1);
    assert!(v["text"].is_string() && v["tokens_per_second"].as_f64().unwrap() > 0.0);

    let out = ok(&["eval", "perplexity", "--model", s(&m1), "--data", s(&corpus), "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    // an untrained model is close to uniform over its 300 tokens
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(ppl > 150.0 && ppl < 600.0, "perplexity {ppl}");
    assert_eq!(v["records"], 100);
}

#[test]
fn batched_prompts_file_gives_the_same_greedy_text_as_single_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-qwen2");
    let prompts = ["fever", "A longer prompt about chest pain and breathing", "发烧"];
    let file = tmp.path().join("p.jsonl");
    let lines: Vec<String> = prompts.iter().map(|p| serde_json::json!({"prompt": p}).to_string()).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let batched = ok(&[
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(&file),
        "--max-new-tokens",
        "10",
        "--json",
        "--batch-size",
        "3",
    ]);
    let batched: Vec<Value> = batched.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(batched.len(), 3);
    for (p, b) in prompts.iter().zip(&batched) {
        let single = ok(&["generate", "--model", s(&model), "--prompt", p, "--max-new-tokens", "10", "--json"]);
        let single: Value = serde_json::from_str(single.trim()).unwrap();
        assert_eq!(b["prompt"], *p);
        assert_eq!(b["text"], single["text"], "prompt {p}");
    }
}

#[test]
fn perplexity_json_matches_transformers() {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("perplexity_golden.json")).unwrap()).unwrap();
    let want = g["models"]["tiny-qwen3"]["perplexity"].as_f64().unwrap();
    let model = fixtures().join("models/tiny-qwen3");
    let out =
        ok(&["eval", "perplexity", "--model", s(&model), "--data", s(&fixtures().join("perplexity.txt")), "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let got = v["perplexity"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-4 * want, "{got} vs {want}");
    assert_eq!(v["tokens"].as_i64().unwrap(), g["models"]["tiny-qwen3"]["total_predicted_tokens"].as_i64().unwrap());
}

/// Places the files of `model` in a Hugging Face cache as the hub client does: content in
/// `blobs/`, `snapshots/COMMIT/FILE` relative symlinks to it.
#[cfg(unix)]
fn cache_snapshot(cache: &Path, repo_id: &str, commit: &str, model: &Path) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in std::fs::read_dir(model).unwrap() {
        let f = f.unwrap();
        let blob = format!("{commit}-{}", f.file_name().to_string_lossy());
        std::fs::copy(f.path(), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), snapshot.join(f.file_name())).unwrap();
    }
}

/// `--model org/name` resolves through the local Hugging Face cache (`$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`): `refs/main` names the snapshot, its symlinked files load, and generation and
/// perplexity equal those of the same model given as a folder; an id not in the cache is one
/// clear error. Nothing is downloaded.
#[cfg(unix)]
#[test]
fn hub_id_resolves_through_the_local_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let (llama, qwen) = (fixtures().join("models/tiny-llama"), fixtures().join("models/tiny-qwen2"));
    cache_snapshot(&cache, "org/tiny", "1111aaaa", &llama);
    cache_snapshot(&cache, "org/tiny", "2222bbbb", &qwen);
    let refs = cache.join("models--org--tiny/refs");
    std::fs::create_dir_all(&refs).unwrap();
    let align = |model: &str, args: &[&str], env: (&str, &Path)| {
        Command::new(env!("CARGO_BIN_EXE_align"))
            .args(["generate", "--model", model])
            .args(args)
            .env("ALIGN_LOG", "warn")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HOME")
            .env(env.0, env.1)
            .output()
            .unwrap()
    };
    let gen = ["--prompt", "fever", "--max-new-tokens", "8", "--json"];
    let text = |out: std::process::Output| -> String {
        assert!(out.status.success(), "align failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let want_llama = text(align(s(&llama), &gen, ("HF_HUB_CACHE", &cache)));
    let want_qwen = text(align(s(&qwen), &gen, ("HF_HUB_CACHE", &cache)));
    assert_ne!(want_llama, want_qwen, "the two snapshots must be told apart by their output");
    for (commit, want) in [("1111aaaa", &want_llama), ("2222bbbb", &want_qwen)] {
        std::fs::write(refs.join("main"), commit).unwrap();
        assert_eq!(&text(align("org/tiny", &gen, ("HF_HUB_CACHE", &cache))), want, "refs/main = {commit}");
    }
    // $HF_HOME/hub when HF_HUB_CACHE is unset
    let home = tmp.path().join("hf-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::rename(&cache, home.join("hub")).unwrap();
    assert_eq!(text(align("org/tiny", &gen, ("HF_HOME", &home))), want_qwen);
    // every model-loading command resolves it the same way: perplexity equals the folder's
    std::fs::write(home.join("hub/models--org--tiny/refs/main"), "1111aaaa").unwrap();
    let ppl = |model: &str| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_align"))
            .args(["eval", "perplexity", "--model", model, "--data", s(&fixtures().join("perplexity.txt")), "--json"])
            .env("ALIGN_LOG", "warn")
            .env_remove("HF_HUB_CACHE")
            .env("HF_HOME", &home)
            .output()
            .unwrap();
        assert!(out.status.success(), "align failed:\n{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
    };
    let (hub, folder) = (ppl("org/tiny"), ppl(s(&llama)));
    assert_eq!(hub["perplexity"], folder["perplexity"]);
    assert_eq!(hub["tokens"], folder["tokens"]);
    // an id the cache does not hold
    let out = align("org/missing", &gen, ("HF_HOME", &home));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("org/missing") && lines[0].contains("local Hugging Face cache"), "{err}");
}

#[test]
fn bad_inputs_give_one_error_line_and_nonzero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let e = fails(&["generate", "--model", s(&tmp.path().join("nope")), "--prompt", "x"]);
    assert!(e.contains("nope") && e.contains("no such model folder"), "{e}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = fails(&["generate", "--model", s(&empty), "--prompt", "x"]);
    assert!(e.contains("config.json"), "{e}");

    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in std::fs::read_dir(fixtures().join("models/tiny-llama")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), broken.join(f.file_name())).unwrap();
    }
    std::fs::write(broken.join("model.safetensors"), b"\x10\x00\x00").unwrap();
    let e = fails(&["eval", "perplexity", "--model", s(&broken), "--data", s(&fixtures().join("perplexity.txt"))]);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"ok\"}\nnot json\n").unwrap();
    let e = fails(&["generate", "--model", s(&fixtures().join("models/tiny-llama")), "--prompts", s(&bad)]);
    assert!(e.contains("bad.jsonl:2: invalid JSON"), "{e}");

    let e =
        fails(&["generate", "--model", s(&fixtures().join("models/tiny-llama")), "--prompt", "x", "--device", "tpu"]);
    assert!(e.contains("device 'tpu'"), "{e}");

    let desc = tmp.path().join("m.toml");
    std::fs::write(&desc, "hidden_size = 32\nnum_layers = 2\n").unwrap();
    let e = fails(&[
        "init",
        "--config",
        s(&desc),
        "--tokenizer",
        s(&fixtures().join("tokenizer")),
        "--out",
        s(&tmp.path().join("o")),
    ]);
    assert!(e.contains("m.toml") && e.contains("unknown key 'num_layers'"), "{e}");
}

/// A model made by `align init` (and its tokenizer) loads in transformers, tokenises the same
/// and renders the same chat template. Skipped without a Python that has transformers.
#[test]
fn init_model_and_tokenizer_load_in_transformers() {
    let Some(python) = python_with(&["transformers"]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(20)).unwrap();
    let tok = tmp.path().join("tok");
    ok(&["tokenizer", "train", "--vocab-size", "300", "--out", s(&tok), s(&corpus)]);
    let desc = tmp.path().join("model.toml");
    std::fs::write(&desc, "hidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\n").unwrap();
    let m = tmp.path().join("m");
    ok(&["init", "--config", s(&desc), "--tokenizer", s(&tok), "--out", s(&m)]);
    let script = r#"
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "发烧怎么办? What is fever?"}]
text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
ids = tok(text, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
print(json.dumps({"text": text, "ids": ids, "argmax": int(logits.argmax())}))
"#;
    let out = Command::new(&python).args(["-c", script, s(&m)]).output().unwrap();
    assert!(out.status.success(), "transformers could not load the model:\n{}", String::from_utf8_lossy(&out.stderr));
    let hf: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();

    let t = align_core::ModelTokenizer::from_dir(&m).unwrap();
    let msgs = vec![
        align_core::text::chat::ChatMessage::new("system", "Be brief."),
        align_core::text::chat::ChatMessage::new("user", "发烧怎么办? What is fever?"),
    ];
    let text = t.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(text, hf["text"].as_str().unwrap());
    let ids = t.encode(&text, false).unwrap();
    let hf_ids: Vec<i64> = serde_json::from_value(hf["ids"].clone()).unwrap();
    assert_eq!(ids, hf_ids);
    let lm = align_core::load_causal_lm(&m, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let logits =
        tch::no_grad(|| lm.lm.forward(&tch::Tensor::from_slice(&ids).view([1, -1]), &Default::default(), None))
            .unwrap();
    assert_eq!(
        logits.get(0).get(ids.len() as i64 - 1).argmax(-1, false).int64_value(&[]),
        hf["argmax"].as_i64().unwrap()
    );
}
