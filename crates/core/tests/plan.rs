//! The memory plan (`train/plan.rs`) on the 2-layer test model: its parts are consistent with
//! each other and with the settings (structural checks; a tiny run's peak is the runtime's, so
//! the plan is checked against measured peaks on SmolLM2 in `crates/cli/tests/memory_plan.rs`).
use std::collections::BTreeSet;
use std::path::Path;

use align_core::hf::config::ModelConfig;
use align_core::model::lora_layer::{LoraConfig, LoraTargets};
use align_core::train::optim::OptimizerKind;
use align_core::train::plan::{last_layers_parameters, parameter_shapes, plan_memory, PlanMethod, PlanSettings};
use tch::Kind;

fn config() -> ModelConfig {
    ModelConfig::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-llama"))
        .unwrap()
}

fn settings(method: PlanMethod) -> PlanSettings {
    PlanSettings {
        dtype: Kind::Float,
        method,
        optimizer: OptimizerKind::Adamw,
        zero_stage: 0,
        world: 1,
        seq: 128,
        batch: 2,
        checkpoint_every: 0,
        loss_chunk_tokens: 0,
        cpu: false,
    }
}

fn lora() -> PlanMethod {
    PlanMethod::Lora {
        lora: LoraConfig { r: 4, targets: LoraTargets::Pattern("all-linear".into()), ..Default::default() },
    }
}

#[test]
fn the_plan_counts_every_parameter_and_its_parts_add_up() {
    let c = config();
    let n: i64 = parameter_shapes(&c).iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    assert_eq!(n, c.num_parameters());
    let p = plan_memory(&c, &settings(PlanMethod::Full)).unwrap();
    assert_eq!(p.parameters, n as u64);
    assert_eq!((p.weights, p.gradients, p.optimizer), (4 * n as u64, 4 * n as u64, 8 * n as u64));
    assert_eq!(p.total, p.weights + p.gradients + p.optimizer + (p.activations + p.logits).max(p.step_scratch));
    assert!(p.activations > 0 && p.logits == 2 * 128 * 320 * 12, "{p:?}");
}

#[test]
fn lora_freeze_checkpointing_chunking_8bit_and_zero_shrink_what_they_should() {
    let c = config();
    let full = plan_memory(&c, &settings(PlanMethod::Full)).unwrap();
    let lora = plan_memory(&c, &settings(lora())).unwrap();
    assert!(lora.gradients < full.gradients / 4 && lora.optimizer < full.optimizer / 4, "{lora:?}");
    assert!(lora.weights > full.weights, "adapters add weights");
    // each adapted projection keeps its own dropout mask and dropped input (as PEFT does), so on
    // a model this small LoRA's activations can exceed full training's; its state cannot
    assert!(lora.weights + lora.gradients + lora.optimizer < full.weights + full.gradients + full.optimizer);
    let frozen = plan_memory(&c, &settings(PlanMethod::Freeze { trainable: last_layers_parameters(&c, 1) })).unwrap();
    assert!(frozen.gradients < full.gradients && frozen.activations < full.activations, "{frozen:?}");
    let none = plan_memory(&c, &settings(PlanMethod::Freeze { trainable: BTreeSet::new() })).unwrap();
    assert_eq!((none.gradients, none.optimizer), (0, 0));

    let mut s = settings(PlanMethod::Full);
    s.checkpoint_every = 1;
    let ckpt = plan_memory(&c, &s).unwrap();
    assert!(ckpt.activations < full.activations, "{} vs {}", ckpt.activations, full.activations);
    s.loss_chunk_tokens = 64;
    assert_eq!(plan_memory(&c, &s).unwrap().logits * 4, full.logits);

    let mut s = settings(PlanMethod::Full);
    s.optimizer = OptimizerKind::Adamw8bit;
    // tiny-llama's only tensor of ≥ 4096 elements is the embedding (320 × 32): 8-bit there
    let eight = plan_memory(&c, &s).unwrap();
    assert_eq!(full.optimizer - eight.optimizer, 6 * 320 * 32 - 8 * 40);
    s.dtype = Kind::BFloat16;
    let half = plan_memory(&c, &s).unwrap();
    assert_eq!(half.weights * 2, full.weights);
    assert!(half.optimizer > eight.optimizer, "f32 master copies");

    let mut s = settings(PlanMethod::Full);
    s.world = 4;
    for stage in 1..=2u8 {
        s.zero_stage = stage;
        let z = plan_memory(&c, &s).unwrap();
        assert_eq!(z.optimizer, full.optimizer.div_ceil(4));
        // the trainer frees ZeRO-2's foreign gradients after the backward: the peak keeps them
        assert_eq!(z.gradients, full.gradients);
        assert_eq!(z.weights, full.weights);
    }
    s.zero_stage = 3;
    assert!(plan_memory(&c, &s).unwrap_err().to_string().contains("ZeRO-3"));
    let q = plan_memory(
        &c,
        &settings(PlanMethod::Qlora {
            lora: LoraConfig { r: 4, targets: LoraTargets::Pattern("all-linear".into()), ..Default::default() },
            double_quant: true,
        }),
    )
    .unwrap();
    assert!(q.weights < lora.weights, "4-bit projections");
    s.zero_stage = 4;
    assert!(plan_memory(&c, &s).is_err());
}
