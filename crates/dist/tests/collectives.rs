//! Two ranks on this machine (Gloo over loopback), each a child process running one test of this
//! file with torchrun's variables set: the values every collective gives, and that a rank whose
//! peer died fails within the timeout instead of hanging.
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use align_dist::{ProcessGroup, ReduceOp, World};
use tch::{Kind, Tensor};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs test `name` of this file as `world` ranks; returns each rank's exit status and stderr.
fn spawn_ranks(name: &str, world: usize, timeout_s: u64) -> Vec<(bool, String)> {
    let port = free_port().to_string();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env("ALIGN_DIST_CHILD", "1")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("ALIGN_DIST_TIMEOUT", timeout_s.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        })
        .collect()
}

fn child() -> bool {
    std::env::var_os("ALIGN_DIST_CHILD").is_some()
}

fn group() -> &'static ProcessGroup {
    tch::set_num_threads(1);
    let w: &World = align_dist::init_from_env().unwrap();
    assert_eq!(w.size(), 2);
    w.group().unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn collectives_give_the_values_of_their_definitions() {
    if !child() {
        for (ok, log) in spawn_ranks("collectives_give_the_values_of_their_definitions", 2, 60) {
            assert!(ok, "a rank failed:\n{log}");
        }
        return;
    }
    let g = group();
    let r = g.rank() as f64;
    // all_reduce: sum, max, min; f32 and bf16; a non-contiguous tensor
    let mut t = Tensor::from_slice(&[1.0 + r as f32, 10.0 * (r as f32 + 1.0), -(r as f32)]);
    g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(values(&t), vec![3.0, 30.0, -1.0]);
    let mut t = Tensor::from_slice(&[r, -r]).to_kind(Kind::BFloat16);
    g.all_reduce(&mut t, ReduceOp::Max).unwrap();
    assert_eq!(values(&t), vec![1.0, 0.0]);
    let mut t = Tensor::from_slice(&[r, -r]);
    g.all_reduce(&mut t, ReduceOp::Min).unwrap();
    assert_eq!(values(&t), vec![0.0, -1.0]);
    let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]).tr() + r;
    g.all_reduce_mean(&mut t).unwrap();
    assert_eq!(values(&t), vec![1.5, 3.5, 2.5, 4.5]);
    // broadcast from rank 1
    let mut t = Tensor::from_slice(&[r * 7.0, r * 8.0]);
    g.broadcast(&mut t, 1).unwrap();
    assert_eq!(values(&t), vec![7.0, 8.0]);
    // reduce to rank 1
    let mut t = Tensor::from_slice(&[r + 1.0]);
    g.reduce(&mut t, 1, ReduceOp::Sum).unwrap();
    if g.rank() == 1 {
        assert_eq!(values(&t), vec![3.0]);
    }
    // all_gather: stacked in rank order
    let t = Tensor::from_slice(&[r, r + 0.5]);
    let all = g.all_gather(&t).unwrap();
    assert_eq!(all.size(), vec![2, 2]);
    assert_eq!(values(&all), vec![0.0, 0.5, 1.0, 1.5]);
    // reduce_scatter: rank k gets the sum of block k
    let t = Tensor::from_slice(&[1.0 + r, 2.0 + r, 3.0 + r, 4.0 + r]);
    let mine = g.reduce_scatter(&t, ReduceOp::Sum).unwrap();
    let want = if g.rank() == 0 { vec![3.0, 5.0] } else { vec![7.0, 9.0] };
    assert_eq!(values(&mine), want);
    // f64 convenience and agreement
    let mut xs = [r, 2.0];
    g.all_reduce_f64(&mut xs, ReduceOp::Sum).unwrap();
    assert_eq!(xs, [1.0, 4.0]);
    let w = align_dist::world();
    w.agree("a constant", 5).unwrap();
    let e = w.agree("the rank", g.rank() as u64).unwrap_err().to_string();
    assert!(e.contains("disagree on the rank"), "{e}");
    // bucketed: flattened buckets of mixed dtypes come back in place
    let ts = vec![
        Tensor::from_slice(&[r; 3]),
        Tensor::from_slice(&[r as f32; 5]).view([5, 1]),
        Tensor::from_slice(&[1.0 + r; 2]),
    ];
    assert_eq!(align_dist::buckets(&ts, 1 << 20), vec![vec![0], vec![1], vec![2]]);
    assert_eq!(align_dist::buckets(&ts, 8).len(), 3);
    align_dist::bucketed(&ts, 16, |flat, _| g.all_reduce(flat, ReduceOp::Sum)).unwrap();
    assert_eq!(values(&ts[0]), vec![1.0; 3]);
    assert_eq!(ts[1].size(), vec![5, 1]);
    assert_eq!(values(&ts[1]), vec![1.0; 5]);
    assert_eq!(values(&ts[2]), vec![3.0; 2]);
    g.barrier().unwrap();
}

#[test]
fn a_rank_whose_peer_died_fails_within_the_timeout() {
    if !child() {
        let started = Instant::now();
        let ranks = spawn_ranks("a_rank_whose_peer_died_fails_within_the_timeout", 2, 5);
        assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
        assert!(!ranks[0].0, "rank 0 should fail:\n{}", ranks[0].1);
        assert!(ranks[0].1.contains("rank 0 of 2: all_reduce failed"), "{}", ranks[0].1);
        return;
    }
    let g = group();
    g.barrier().unwrap();
    if g.rank() == 1 {
        std::process::exit(3); // dies without a word
    }
    let mut t = Tensor::from_slice(&[1.0f32]);
    g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
}

#[test]
fn a_world_of_one_needs_no_group() {
    if child() {
        return;
    }
    let w = World::single();
    assert!(w.is_main() && w.group().is_none() && w.size() == 1);
    w.barrier().unwrap();
    let mut xs = [2.0];
    w.sum_f64(&mut xs).unwrap();
    assert_eq!(xs, [2.0]);
    assert!(align_dist::Backend::parse("nccl").unwrap_err().to_string().contains("Gloo backend only"));
}
