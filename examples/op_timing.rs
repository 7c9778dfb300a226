use candle_core::{Device, Tensor, DType};
use std::time::Instant;
fn t<F: FnMut()>(name: &str, mut f: F) { f(); let s = Instant::now(); for _ in 0..5 { f(); } println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 200.0); }
fn main() {
    greencode::threads::init(std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(2));
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (1024, 384), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (1024, 384), &d).unwrap();
    let w2 = Tensor::randn(0f32, 1., (384, 1024), &d).unwrap();
    let wq = Tensor::randn(0f32, 1., (384, 384), &d).unwrap();
    t("x@W_up^T [1024x384]x[384x1024]", || { let _ = x.matmul(&w.t().unwrap()).unwrap(); });
    let wt = w.t().unwrap().contiguous().unwrap();
    t("x@W_up (contig) ", || { let _ = x.matmul(&wt).unwrap(); });
    let h = Tensor::randn(0f32, 1., (1024, 1024), &d).unwrap();
    t("h@W_down^T [1024x1024]x[1024x384]", || { let _ = h.matmul(&w2.t().unwrap()).unwrap(); });
    t("x@Wq^T", || { let _ = x.matmul(&wq.t().unwrap()).unwrap(); });
    let q = Tensor::randn(0f32, 1., (1, 2, 3072, 64), &d).unwrap();
    let k = Tensor::randn(0f32, 1., (1, 2, 1024, 64), &d).unwrap();
    t("scores q@k^T [2,3072,64]x[2,64,1024]", || { let _ = q.matmul(&k.t().unwrap()).unwrap(); });
    let sc = Tensor::randn(0f32, 1., (1, 2, 3072, 1024), &d).unwrap();
    t("softmax [2,3072,1024]", || { let _ = candle_nn::ops::softmax_last_dim(&sc).unwrap(); });
    let mask = Tensor::zeros((1024, 1024), DType::F32, &d).unwrap();
    t("mask add", || { let _ = sc.reshape((1,2,3,1024,1024)).unwrap().broadcast_add(&mask).unwrap(); });
    t("probs@v", || { let _ = sc.matmul(&k).unwrap(); });
    t("silu [1024x1024]", || { let _ = h.silu().unwrap(); });
    t("mul", || { let _ = (&h * &h).unwrap(); });
}
