//! A GGUF (version 3) writer that takes tensors one at a time: the header,
//! metadata and tensor table first (every tensor's type and shape known
//! up front), then each tensor's bytes as it is made, so writing a 7B model
//! holds one tensor, not the file, in memory. candle's writer takes every
//! tensor at once.

use std::io::{self, Write};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

/// Alignment of the data section and of every tensor in it.
pub const ALIGNMENT: usize = 32;

/// A tensor's entry in the table: its name, row-major shape and type.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape, outermost first (`[rows, cols]`; GGUF stores it reversed).
    pub dims: Vec<usize>,
    /// Storage type.
    pub ty: GgmlDType,
}

impl TensorEntry {
    /// Bytes of its data.
    pub fn bytes(&self) -> usize {
        self.dims.iter().product::<usize>() / self.ty.block_size() * self.ty.type_size()
    }
}

/// GGML's type id.
fn type_id(ty: GgmlDType) -> u32 {
    match ty {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGUF's metadata value type id.
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_string(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_string(w, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, value_type_id);
            if items.iter().any(|i| value_type_id(i) != ty) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a GGUF array of mixed types",
                ));
            }
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

fn pad(w: &mut impl Write, written: usize) -> io::Result<usize> {
    let padding = (ALIGNMENT - written % ALIGNMENT) % ALIGNMENT;
    w.write_all(&[0u8; ALIGNMENT][..padding])?;
    Ok(padding)
}

/// Writes a GGUF file: [`GgufWriter::new`] writes everything before the
/// data, [`GgufWriter::tensor`] each tensor's bytes in table order,
/// [`GgufWriter::finish`] checks that all came.
pub struct GgufWriter<W: Write> {
    out: W,
    entries: Vec<TensorEntry>,
    next: usize,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header, `metadata` and the table of `entries`.
    pub fn new(mut out: W, metadata: &[(&str, Value)], entries: Vec<TensorEntry>) -> io::Result<Self> {
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            write_string(&mut head, key)?;
            head.extend_from_slice(&value_type_id(value).to_le_bytes());
            write_value(&mut head, value)?;
        }
        let mut offset = 0usize;
        for e in &entries {
            write_string(&mut head, &e.name)?;
            head.extend_from_slice(&(e.dims.len() as u32).to_le_bytes());
            for &d in e.dims.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&type_id(e.ty).to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += e.bytes().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        out.write_all(&head)?;
        pad(&mut out, head.len())?;
        Ok(Self { out, entries, next: 0 })
    }

    /// The next tensor's entry (the one [`GgufWriter::tensor`] writes next).
    pub fn next_entry(&self) -> Option<&TensorEntry> {
        self.entries.get(self.next)
    }

    /// Writes the next tensor's bytes (exactly its entry's size).
    pub fn tensor(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(e) = self.entries.get(self.next) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more tensors than the table lists",
            ));
        };
        if bytes.len() != e.bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {} bytes, the table says {}", e.name, bytes.len(), e.bytes()),
            ));
        }
        self.out.write_all(bytes)?;
        pad(&mut self.out, bytes.len())?;
        self.next += 1;
        Ok(())
    }

    /// Checks every listed tensor was written and hands back the output.
    pub fn finish(self) -> io::Result<W> {
        if self.next != self.entries.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} of {} tensors written", self.next, self.entries.len()),
            ));
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    #[test]
    fn candle_reads_back_what_it_wrote() {
        let meta = [
            ("general.architecture", Value::String("qwen2".into())),
            ("a.list", Value::Array(vec![Value::U32(3), Value::U32(5)])),
            ("a.float", Value::F32(0.5)),
        ];
        let entries = vec![
            TensorEntry {
                name: "v".into(),
                dims: vec![3],
                ty: GgmlDType::F32,
            },
            TensorEntry {
                name: "m".into(),
                dims: vec![2, 32],
                ty: GgmlDType::Q8_0,
            },
        ];
        let mut w = GgufWriter::new(Vec::new(), &meta, entries).unwrap();
        assert!(w.tensor(&[0u8; 5]).is_err(), "a wrong size is refused");
        let v: Vec<u8> = [1f32, 2.0, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        w.tensor(&v).unwrap();
        let q: Vec<u8> = (0..68u8).collect();
        w.tensor(&q).unwrap();
        let bytes = w.finish().unwrap();
        let mut cur = std::io::Cursor::new(bytes);
        let content = gguf_file::Content::read(&mut cur).unwrap();
        assert_eq!(content.metadata["a.list"].to_vec().unwrap().len(), 2);
        assert_eq!(content.metadata["a.float"].to_f32().unwrap(), 0.5);
        let t = content.tensor(&mut cur, "v", &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            t.dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0, 2.0, 3.0]
        );
        let m = content.tensor(&mut cur, "m", &candle_core::Device::Cpu).unwrap();
        assert_eq!(m.shape().dims(), [2, 32]);
        assert_eq!(&*m.data().unwrap(), &q[..]);
    }

    #[test]
    fn a_missing_tensor_is_an_error() {
        let entries = vec![TensorEntry {
            name: "v".into(),
            dims: vec![8],
            ty: GgmlDType::F32,
        }];
        let w = GgufWriter::new(Vec::new(), &[], entries).unwrap();
        assert!(w.finish().is_err());
    }
}
