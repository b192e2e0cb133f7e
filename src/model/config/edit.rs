//! Minimal textual edits of block-style YAML, for `model_config.yaml` rewrites.
//!
//! Owns finding a key by walking nested block mappings by indentation and rewriting only the byte
//! span of its one-line scalar value (or appending a missing key), so comments, order and quoting
//! elsewhere survive byte for byte. It refuses anything it cannot edit on one line (block scalars,
//! flow collections, anchors, tags); the caller re-parses the result to verify it.

/// One physical line: its content (without terminator) and its byte range in the text.
struct Line<'a> {
    body: &'a str,
    start: usize,
    end: usize,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for piece in text.split_inclusive('\n') {
        let end = start + piece.len();
        let body = piece.strip_suffix('\n').unwrap_or(piece);
        let body = body.strip_suffix('\r').unwrap_or(body);
        out.push(Line { body, start, end });
        start = end;
    }
    out
}

fn indent(s: &str) -> usize {
    s.len() - s.trim_start_matches(' ').len()
}

/// Blank lines, comments and document markers carry no mapping content.
fn is_content(s: &str) -> bool {
    let t = s.trim();
    !(t.is_empty() || t.starts_with('#') || t == "---" || t == "..." || t.starts_with('%'))
}

/// If `body` is `<indent>key:` (plain or quoted key) at indentation `ind`, the byte offset
/// just after the colon.
fn key_colon(body: &str, ind: usize, key: &str) -> Option<usize> {
    if indent(body) != ind {
        return None;
    }
    let rest = body.get(ind..)?;
    let after = [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
        .iter()
        .find_map(|k| rest.strip_prefix(k.as_str()).map(|r| (k.len(), r)))?;
    let (klen, r) = after;
    let r = r.trim_start_matches([' ', '\t']);
    let colon_at = ind + klen + (rest.len() - klen - r.len());
    let tail = r.strip_prefix(':')?;
    if tail.is_empty() || tail.starts_with([' ', '\t']) {
        Some(colon_at + 1)
    } else {
        None
    }
}

/// A block mapping: the line range `[from, to)` holding its entries and their indentation.
struct Block {
    from: usize,
    to: usize,
    ind: Option<usize>,
}

/// Line index of the last content line in `[from, to)`, if any.
fn last_content(ls: &[Line<'_>], from: usize, to: usize) -> Option<usize> {
    (from..to)
        .rev()
        .find(|&i| ls.get(i).is_some_and(|l| is_content(l.body)))
}

/// The block under the key on line `k` (with indentation `kind`): following lines up to the
/// next content line indented `<= kind`.
fn child_block(ls: &[Line<'_>], k: usize, kind: usize) -> Block {
    let from = k + 1;
    let mut to = ls.len();
    let mut ind = None;
    for (i, l) in ls.iter().enumerate().skip(from) {
        if !is_content(l.body) {
            continue;
        }
        let d = indent(l.body);
        if d <= kind {
            to = i;
            break;
        }
        if ind.is_none() {
            ind = Some(d);
        }
    }
    Block { from, to, ind }
}

/// Finds the line of `key` directly inside `b`.
fn find_in(ls: &[Line<'_>], b: &Block, key: &str) -> Option<(usize, usize)> {
    let ind = b.ind?;
    (b.from..b.to).find_map(|i| {
        let l = ls.get(i)?;
        key_colon(l.body, ind, key).map(|c| (i, c))
    })
}

/// The byte span (relative to the line body) of the inline scalar value after the colon at
/// `colon_end`, or `Ok(None)` when nothing follows on the line (null or a nested block).
fn value_span(body: &str, colon_end: usize) -> Result<Option<(usize, usize)>, &'static str> {
    let tail = body.get(colon_end..).ok_or("line ends early")?;
    let start = colon_end + (tail.len() - tail.trim_start_matches([' ', '\t']).len());
    let v = body.get(start..).ok_or("line ends early")?;
    let first = match v.chars().next() {
        None | Some('#') => return Ok(None),
        Some(c) => c,
    };
    let len = match first {
        '"' => {
            let mut esc = false;
            let mut end = None;
            for (i, c) in v.char_indices().skip(1) {
                match (esc, c) {
                    (true, _) => esc = false,
                    (false, '\\') => esc = true,
                    (false, '"') => {
                        end = Some(i + 1);
                        break;
                    }
                    _ => {}
                }
            }
            end.ok_or("double-quoted value continues on the next line")?
        }
        '\'' => {
            let b = v.as_bytes();
            let mut i = 1;
            let mut end = None;
            while let Some(&c) = b.get(i) {
                if c == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    end = Some(i + 1);
                    break;
                }
                i += 1;
            }
            end.ok_or("single-quoted value continues on the next line")?
        }
        '|' | '>' => return Err("value is a block scalar"),
        '{' | '[' => return Err("value is a flow collection"),
        '&' | '*' => return Err("value uses an anchor or alias"),
        '!' => return Err("value carries a tag"),
        _ => {
            // A plain scalar ends at " #" (a comment) or the end of the line.
            let cut = v
                .char_indices()
                .find(|&(i, c)| c == '#' && v.get(..i).is_some_and(|p| p.ends_with([' ', '\t'])))
                .map(|(i, _)| i)
                .unwrap_or(v.len());
            v.get(..cut).map(|s| s.trim_end().len()).unwrap_or(0)
        }
    };
    let rest = v.get(len..).unwrap_or("").trim_start_matches([' ', '\t']);
    if !(rest.is_empty() || rest.starts_with('#')) {
        return Err("unexpected text after the quoted value");
    }
    Ok(Some((start, start + len)))
}

fn newline_of(text: &str) -> &'static str {
    if text.contains("\r\n") {
        "\r\n"
    } else {
        "\n"
    }
}

/// Sets the scalar at `path` (mapping keys from the document root) to the YAML text `value`.
pub(super) fn set(text: &str, path: &[&str], value: &str) -> Result<String, &'static str> {
    let ls = lines(text);
    let first_ind = ls
        .iter()
        .find(|l| is_content(l.body))
        .map(|l| indent(l.body));
    let mut block = Block {
        from: 0,
        to: ls.len(),
        ind: first_ind,
    };
    let nl = newline_of(text);
    for (depth, key) in path.iter().enumerate() {
        let is_last = depth + 1 == path.len();
        match find_in(&ls, &block, key) {
            Some((i, colon)) => {
                let l = ls.get(i).ok_or("line out of range")?;
                let kind = indent(l.body);
                let span = value_span(l.body, colon)?;
                let child = child_block(&ls, i, kind);
                if !is_last {
                    if span.is_some() {
                        return Err("a parent key holds a scalar, not a mapping");
                    }
                    block = child;
                    continue;
                }
                if child.ind.is_some() {
                    // A nested block or a multi-line plain scalar follows: not one line.
                    return Err("value is a mapping, sequence or multi-line scalar");
                }
                // A block sequence may sit at the key's own indentation.
                let next = ls.iter().skip(i + 1).find(|l| is_content(l.body));
                if next
                    .is_some_and(|n| indent(n.body) == kind && n.body.trim_start().starts_with('-'))
                {
                    return Err("value is a block sequence");
                }
                let mut out = String::with_capacity(text.len() + value.len());
                let (a, b, insert) = match span {
                    Some((s, e)) => (l.start + s, l.start + e, value.to_string()),
                    None => (l.start + colon, l.start + colon, format!(" {value}")),
                };
                out.push_str(text.get(..a).ok_or("span out of range")?);
                out.push_str(&insert);
                out.push_str(text.get(b..).ok_or("span out of range")?);
                return Ok(out);
            }
            None => {
                // Append the missing key (and any missing parents) after the block's last
                // content line, so trailing comments keep their place.
                let ind = match block.ind {
                    Some(d) => d,
                    None if depth == 0 => 0,
                    None => return Err("the parent mapping is empty; cannot infer indentation"),
                };
                let mut lines_out = String::new();
                for (k, part) in path.iter().enumerate().skip(depth) {
                    let pad = " ".repeat(ind + 2 * (k - depth));
                    if k + 1 == path.len() {
                        lines_out.push_str(&format!("{pad}{part}: {value}{nl}"));
                    } else {
                        lines_out.push_str(&format!("{pad}{part}:{nl}"));
                    }
                }
                let at = match last_content(&ls, block.from, block.to) {
                    Some(j) => ls.get(j).map(|l| l.end).ok_or("line out of range")?,
                    None => block_start_offset(&ls, &block, text.len()),
                };
                let mut out = String::with_capacity(text.len() + lines_out.len() + 2);
                let head = text.get(..at).ok_or("offset out of range")?;
                out.push_str(head);
                if !head.is_empty() && !head.ends_with('\n') {
                    out.push_str(nl);
                }
                out.push_str(&lines_out);
                out.push_str(text.get(at..).ok_or("offset out of range")?);
                return Ok(out);
            }
        }
    }
    Err("empty key")
}

fn block_start_offset(ls: &[Line<'_>], b: &Block, text_len: usize) -> usize {
    ls.get(b.from).map(|l| l.start).unwrap_or(text_len)
}

#[cfg(test)]
mod tests {
    use super::{set, value_span};

    #[test]
    fn value_spans() {
        let span = |s: &str| value_span(s, s.find(':').unwrap() + 1);
        assert_eq!(span("a: 12  # c"), Ok(Some((3, 5))));
        assert_eq!(span("a: x#y"), Ok(Some((3, 6))));
        assert_eq!(span(r##"a: "q\"#" # c"##), Ok(Some((3, 9))));
        assert_eq!(span("a: 'it''s' "), Ok(Some((3, 10))));
        assert_eq!(span("a:"), Ok(None));
        assert_eq!(span("a:   # only a comment"), Ok(None));
        assert!(span("a: 'open").is_err());
        assert!(span("a: \"x\" y").is_err());
        assert!(span("a: >-").is_err());
        assert!(span("a: !!str 5").is_err());
    }

    #[test]
    fn sets_nested_and_quoted_keys() {
        let text = "---\n\"a\": 1\nb:\n    c: 2   # keep\n    d: 3\n";
        assert_eq!(
            set(text, &["b", "c"], "9").unwrap(),
            "---\n\"a\": 1\nb:\n    c: 9   # keep\n    d: 3\n"
        );
        assert_eq!(
            set(text, &["a"], "x").unwrap(),
            "---\n\"a\": x\nb:\n    c: 2   # keep\n    d: 3\n"
        );
        assert_eq!(
            set(text, &["b", "e"], "5").unwrap(),
            "---\n\"a\": 1\nb:\n    c: 2   # keep\n    d: 3\n    e: 5\n"
        );
        assert!(set(text, &["a", "x"], "1").is_err());
    }
}
