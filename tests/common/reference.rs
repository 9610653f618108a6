//! A small reference parser for `text/event-stream`, written straight from the WHATWG
//! "interpreting an event stream" steps: the whole input at once, split into lines, every field
//! buffered. Slow and simple on purpose, to check the incremental scanner against.

/// What a conforming client makes of a whole stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The id committed at each dispatch that followed an accepted `id` field.
    pub commits: Vec<String>,
    /// Blank lines that ended a block with at least one field line.
    pub dispatches: usize,
    /// Events fired (non-empty data): (last event id, data).
    pub events: Vec<(String, String)>,
    /// `id` fields ignored (NUL, not UTF-8, or longer than `max_id_len` bytes).
    pub rejected: usize,
}

pub fn parse(input: &[u8], max_id_len: usize) -> Parsed {
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    // Split into complete lines; a trailing piece with no line end is never processed.
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\r' => {
                lines.push(&input[start..i]);
                if input.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            b'\n' => {
                lines.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }

    let mut out = Parsed::default();
    let mut id_buffer: Vec<u8> = Vec::new();
    let mut id_set = false;
    let mut fields = false;
    let mut data = String::new();
    for line in lines {
        if line.is_empty() {
            if fields {
                out.dispatches += 1;
            }
            if id_set {
                out.commits
                    .push(String::from_utf8_lossy(&id_buffer).into_owned());
            }
            if !data.is_empty() {
                data.pop();
                let last_event_id = String::from_utf8_lossy(&id_buffer).into_owned();
                out.events.push((last_event_id, std::mem::take(&mut data)));
            }
            id_set = false;
            fields = false;
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        fields = true;
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"id" => {
                if value.contains(&0)
                    || std::str::from_utf8(value).is_err()
                    || value.len() > max_id_len
                {
                    out.rejected += 1;
                } else {
                    id_buffer = value.to_vec();
                    id_set = true;
                }
            }
            b"data" => {
                data.push_str(&String::from_utf8_lossy(value));
                data.push('\n');
            }
            _ => {}
        }
    }
    out
}
