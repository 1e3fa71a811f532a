//! `align export --format gguf` end to end: the tiny models (llama, qwen2, mistral, qwen3; f32,
//! f16, bf16, q8_0; a merged adapter) read back with gguf-py (tests/reference/check_gguf.py:
//! metadata, tensor names, shapes, values), greedy tokens of llama.cpp (when `llama_cpp` is
//! installed) equal to `align generate`, and one-line errors for bad flags and models.
use std::path::{Path, PathBuf};
use std::process::Command;

use align_testkit::python_with;
use serde_json::Value;

mod support;
use support::{fails, fixtures, ok, repo, s};

fn export(model: &Path, out: &Path, dtype: &str) -> String {
    ok(&["export", "--format", "gguf", "--model", s(model), "--out", s(out), "--dtype", dtype, "--device", "cpu"])
}

/// Runs check_gguf.py on `file` against the HF folder `hf`; panics with its report on a difference.
fn check_gguf(python: &Path, file: &Path, hf: &Path, dtype: &str, name: &str, pre: &str) {
    let r = Command::new(python)
        .arg(repo().join("tests/reference/check_gguf.py"))
        .args([s(file), s(hf), "--dtype", dtype, "--name", name, "--pre", pre])
        .output()
        .expect("run check_gguf.py");
    let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success(), "gguf-py does not read back what {} holds:\n{text}", hf.display());
}

#[test]
fn gguf_files_read_back_in_gguf_py_with_the_hf_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let python = python_with(&["gguf", "transformers", "safetensors"]);
    let mut cases: Vec<(&str, &str)> = Vec::new();
    for model in ["tiny-llama", "tiny-qwen2"] {
        for dtype in ["f32", "f16", "bf16", "q8_0"] {
            cases.push((model, dtype));
        }
    }
    cases.extend([("tiny-mistral", "f16"), ("tiny-qwen3", "q8_0"), ("tiny-llama-sharded-bf16", "f16")]);
    for (model, dtype) in cases {
        let dir = fixtures().join("models").join(model);
        let out = tmp.path().join(format!("{model}-{dtype}.gguf"));
        let stdout = export(&dir, &out, dtype);
        let arch = if model.contains("qwen2") {
            "qwen2"
        } else if model.contains("qwen3") {
            "qwen3"
        } else {
            "llama"
        };
        assert!(stdout.contains(&format!("({arch}, {dtype}:")) && stdout.contains("pre-tokenizer qwen2"), "{stdout}");
        assert_eq!(&std::fs::read(&out).unwrap()[..4], b"GGUF");
        if let Some(python) = &python {
            check_gguf(python, &out, &dir, dtype, model, "qwen2");
        }
    }
    // replacing an earlier export is fine; nothing is left beside the file
    let out = tmp.path().join("tiny-llama-f16.gguf");
    export(&fixtures().join("models/tiny-llama"), &out, "f16");
    let stray: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

#[test]
fn gguf_export_merges_an_adapter_first() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-llama");
    let adapter = fixtures().join("peft/llama-all");
    let out = tmp.path().join("merged.gguf");
    let stdout = ok(&[
        "export",
        "--format",
        "gguf",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
        "--dtype",
        "f32",
        "--device",
        "cpu",
    ]);
    assert!(stdout.contains("merged") && stdout.contains("wrote"), "{stdout}");
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(names, vec!["merged.gguf".to_string()], "the merged folder is removed");
    // the same merge as an HF folder (f32) is what the GGUF file must hold
    let folder = tmp.path().join("merged-hf");
    ok(&[
        "export",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&folder),
        "--dtype",
        "f32",
        "--device",
        "cpu",
    ]);
    if let Some(python) = python_with(&["gguf", "transformers", "safetensors"]) {
        check_gguf(&python, &out, &folder, "f32", "llama-all", "qwen2");
    }
}

#[test]
fn gguf_export_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixtures().join("models/tiny-llama");
    let out = tmp.path().join("m.gguf");
    let e = fails(&["export", "--format", "gguf", "--model", s(&llama), "--out", s(&out), "--dtype", "q4_k"]);
    assert!(e.contains("--dtype") && e.contains("q4_k") && e.contains("q8_0"), "{e}");
    let e = fails(&["export", "--format", "gguf", "--model", s(&llama), "--out", s(tmp.path())]);
    assert!(e.contains("is a folder") && e.contains("one file"), "{e}");
    let e = fails(&["export", "--format", "gguf", "--out", s(&out)]);
    assert!(e.contains("--model") && e.contains("required"), "{e}");
    // a file that is not an earlier export is replaced only with --force
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "mine").unwrap();
    let e = fails(&["export", "--format", "gguf", "--model", s(&llama), "--out", s(&notes)]);
    assert!(e.contains("not a .gguf file") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine");

    // a copy of tiny-llama with another model type, or another tokenizer
    let copy = |name: &str| -> PathBuf {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&llama).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        dir
    };
    let gpt2 = copy("gpt2");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(gpt2.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(gpt2.join("config.json"), cfg.to_string()).unwrap();
    let e = fails(&["export", "--format", "gguf", "--model", s(&gpt2), "--out", s(&out)]);
    assert!(e.contains("config.json") && e.contains("model_type") && e.contains("'gpt2'"), "{e}");

    let sp = copy("sentencepiece");
    std::fs::remove_file(sp.join("tokenizer.json")).unwrap();
    std::fs::write(sp.join("tokenizer.model"), b"not read").unwrap();
    let e = fails(&["export", "--format", "gguf", "--model", s(&sp), "--out", s(&out)]);
    assert!(e.contains("SentencePiece") && e.contains("byte-level BPE"), "{e}");

    let wordlevel = copy("metaspace");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(wordlevel.join("tokenizer.json")).unwrap()).unwrap();
    tok["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"});
    std::fs::write(wordlevel.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = fails(&["export", "--format", "gguf", "--model", s(&wordlevel), "--out", s(&out)]);
    assert!(e.contains("pre_tokenizer") && e.contains("Metaspace") && e.contains("not byte-level"), "{e}");

    // a reward-model adapter has no LM head to export
    let seqcls = fixtures().join("peft/llama-seqcls");
    let e = fails(&[
        "export",
        "--format",
        "gguf",
        "--model",
        s(&llama),
        "--adapter",
        s(&seqcls),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("reward-model adapter") && e.contains("--format hf"), "{e}");
    assert!(!out.exists(), "nothing is written on failure");
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// llama.cpp's greedy continuation of `prompt` from `file` equals `align generate` on `hf`.
fn llama_cpp_equals_align(python: &Path, file: &Path, hf: &Path, prompt: &str, n: usize) {
    let r = Command::new(python)
        .arg(repo().join("tests/reference/check_gguf_llama_cpp.py"))
        .args([s(file), s(hf), prompt, &n.to_string()])
        .output()
        .expect("run check_gguf_llama_cpp.py");
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "llama.cpp cannot run {}:\n{stdout}{}",
        file.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    let got: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("one JSON line");
    assert_eq!(
        got["prompt_ids"],
        got["hf_prompt_ids"],
        "{}: llama.cpp tokenizes the prompt differently",
        file.display()
    );
    let n = n.to_string();
    let ours: Value = serde_json::from_str(
        ok(&["generate", "--model", s(hf), "--prompt", prompt, "--max-new-tokens", &n, "--device", "cpu", "--json"])
            .trim(),
    )
    .unwrap();
    assert_eq!(
        got["text"],
        ours["text"],
        "{}: llama.cpp's greedy tokens {} differ from align generate's",
        file.display(),
        got["ids"]
    );
}

#[test]
fn llama_cpp_generates_what_align_generates() {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    let python = std::env::var_os("ALIGN_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"));
    let importable =
        Command::new(&python).args(["-c", "import llama_cpp, tokenizers"]).output().is_ok_and(|o| o.status.success());
    if !importable {
        // optional: llama-cpp-python builds llama.cpp from source when installed
        println!(
            "SKIPPED {test}: {} cannot import llama_cpp (pip install llama-cpp-python to run it)",
            python.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (model, dtype) in [("tiny-llama", "f32"), ("tiny-qwen2", "f32"), ("tiny-mistral", "f32"), ("tiny-qwen3", "f32")]
    {
        let dir = fixtures().join("models").join(model);
        let out = tmp.path().join(format!("{model}.gguf"));
        export(&dir, &out, dtype);
        llama_cpp_equals_align(&python, &out, &dir, "fever and rest", 12);
    }
    match std::env::var_os("ALIGN_SMOLLM2_DIR").filter(|d| !d.is_empty()).map(PathBuf::from) {
        Some(dir) => {
            let out = tmp.path().join("smollm2.gguf");
            export(&dir, &out, "f32");
            llama_cpp_equals_align(&python, &out, &dir, "The capital of France is", 16);
        }
        None => println!("{test}: ALIGN_SMOLLM2_DIR not set, SmolLM2 not checked"),
    }
}
