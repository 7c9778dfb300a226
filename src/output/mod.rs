//! What the offline commands write, whole or not at all: output folders
//! filled under a temporary name and renamed into place (`out_dir`),
//! Hugging Face model folders with their tokenizer and side files
//! (`hf_folder`, for prune and recover), GGUF files that llama.cpp loads
//! (`gguf`, for `greencode quantize`), and progress lines on stderr for
//! the long stages (`progress`).

pub mod gguf;
pub mod gguf_writer;
pub mod hf_folder;
pub mod out_dir;
pub mod progress;
