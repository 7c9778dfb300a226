use candle_core::{Tensor, D};
use greencode::pipeline::Pipeline;
use std::time::Instant;
fn main() {
    greencode::threads::init(2);
    let p = Pipeline::load_cpu(std::path::Path::new("models/tiny-coder")).unwrap();
    let m = &p.model;
    for (b, t) in [(1usize, 1024usize), (4, 256), (1, 256), (4, 512)] {
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 16000) as u32).collect();
        let x = Tensor::from_vec(ids, (b, t), m.device()).unwrap();
        let _ = m.logits(&x, None).unwrap();
        let s = Instant::now();
        let n = 3;
        for _ in 0..n {
            let _ = m.logits(&x, None).unwrap();
        }
        let el = s.elapsed().as_secs_f64() / n as f64;
        let h = m.embed(&x).unwrap();
        let s2 = Instant::now();
        let mut hh = h.clone();
        for i in 0..m.num_layers() {
            hh = m.layer_forward(i, &hh).unwrap();
        }
        let body = s2.elapsed().as_secs_f64();
        let s3 = Instant::now();
        let lg = m.head(&hh).unwrap();
        let head = s3.elapsed().as_secs_f64();
        let s4 = Instant::now();
        let _ = candle_nn::ops::log_softmax(&lg, D::Minus1).unwrap();
        let ls = s4.elapsed().as_secs_f64();
        println!(
            "b={b} t={t}: logits {:.3}s ({:.0} tok/s) body {:.3} head {:.3} log_softmax {:.3}",
            el,
            (b * t) as f64 / el,
            body,
            head,
            ls
        );
    }
}
