//! Decoding of protocol-0 text operands (`INT`, `LONG`, `FLOAT`, `STRING`,
//! `UNICODE`, `PUT`/`GET` indices) for the pickle reader. Errors are plain
//! reasons; the VM adds offset and opcode.

use crate::formats::torch::value::Value;

fn ascii(l: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(l).map_err(|_| "non-ASCII number text".to_string())
}

/// `INT` (`I`), `LONG` (`L`) or `FLOAT` (`F`) operand.
pub(crate) fn number(op: u8, l: &[u8]) -> Result<Value, String> {
    let s = ascii(l)?.trim();
    match op {
        b'F' => s
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("bad float text {s:?}")),
        b'I' if s == "00" => Ok(Value::Bool(false)),
        b'I' if s == "01" => Ok(Value::Bool(true)),
        _ => {
            let s = s.strip_suffix('L').unwrap_or(s);
            s.parse::<i64>()
                .map(Value::Int)
                .map_err(|_| format!("bad or oversized int text {s:?}"))
        }
    }
}

/// A `PUT`/`GET` decimal index.
pub(crate) fn memo_index(l: &[u8]) -> Result<u64, String> {
    let s = ascii(l)?.trim();
    s.parse::<u64>()
        .map_err(|_| format!("bad memo index text {s:?}"))
}

/// A Python 2 `repr(str)` operand of `STRING`: quoted, with backslash escapes.
pub(crate) fn string_literal(l: &[u8]) -> Result<Vec<u8>, String> {
    let inner = match l {
        [q, rest @ .., q2] if (*q == b'\'' || *q == b'"') && q == q2 => rest,
        _ => return Err("STRING operand is not quoted".into()),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while let Some(&c) = inner.get(i) {
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *inner.get(i).ok_or("dangling backslash")?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'0'..=b'7' => {
                // up to three octal digits
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    match inner.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let h = inner.get(i..i + 2).ok_or("short \\x escape")?;
                let h = std::str::from_utf8(h).map_err(|_| "bad \\x escape")?;
                out.push(u8::from_str_radix(h, 16).map_err(|_| "bad \\x escape")?);
                i += 2;
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// A `raw-unicode-escape` operand of `UNICODE`: UTF-8-free latin-1 bytes with
/// `\uXXXX` / `\UXXXXXXXX` escapes.
pub(crate) fn raw_unicode_escape(l: &[u8]) -> Result<String, String> {
    let mut out = String::with_capacity(l.len());
    let mut i = 0;
    while let Some(&c) = l.get(i) {
        i += 1;
        if c == b'\\' {
            let width = match l.get(i) {
                Some(b'u') => 4,
                Some(b'U') => 8,
                _ => 0,
            };
            if width > 0 {
                let h = l.get(i + 1..i + 1 + width).ok_or("short unicode escape")?;
                let h = std::str::from_utf8(h).map_err(|_| "bad unicode escape")?;
                let cp = u32::from_str_radix(h, 16).map_err(|_| "bad unicode escape")?;
                out.push(char::from_u32(cp).ok_or("escape is not a code point")?);
                i += 1 + width;
                continue;
            }
        }
        out.push(c as char);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_operands_decode() {
        assert_eq!(number(b'I', b"01"), Ok(Value::Bool(true)));
        assert_eq!(number(b'I', b"-12"), Ok(Value::Int(-12)));
        assert_eq!(number(b'L', b"5L"), Ok(Value::Int(5)));
        assert_eq!(number(b'F', b"0.5"), Ok(Value::Float(0.5)));
        assert!(number(b'I', b"x").is_err());
        assert_eq!(memo_index(b"3"), Ok(3));
        assert_eq!(string_literal(b"'a\\n\\x41\\101'"), Ok(b"a\nAA".to_vec()));
        assert!(string_literal(b"abc").is_err());
        assert_eq!(raw_unicode_escape(b"h\\u00e9"), Ok("h\u{e9}".to_string()));
        assert!(raw_unicode_escape(b"\\u12").is_err());
    }
}
