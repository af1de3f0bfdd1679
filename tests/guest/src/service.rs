//! The TCP counter service: one reply line per request line, many requests per connection,
//! one thread per connection.
//!
//! Requests: `INC` (increment, reply the new value), `GET` (reply the value), `CHECK` (reply
//! `ok mem=<m> disk=<d>` or `mismatch mem=<m> disk=<d>`). Anything else gets `err ...`. A
//! line longer than [`MAX_LINE`] closes the connection: input never drives allocation.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use crate::counter::Counter;

/// Longest accepted request line, in bytes (without the newline).
pub const MAX_LINE: usize = 256;

/// Answers one request line.
pub fn answer(counter: &Counter, line: &str) -> String {
    match line.trim() {
        "INC" => match counter.increment() {
            Ok(v) => v.to_string(),
            Err(e) => format!("err {e}"),
        },
        "GET" => counter.get().to_string(),
        "CHECK" => match counter.check() {
            Ok(c) => c.line(),
            Err(e) => format!("err {e}"),
        },
        other => format!("err unknown request {:?}", truncate(other, 32)),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Accepts connections forever.
pub fn serve(listener: TcpListener, counter: Arc<Counter>) -> io::Result<()> {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("remus-guest: accept: {e}");
                continue;
            }
        };
        let counter = counter.clone();
        thread::spawn(move || {
            if let Err(e) = connection(stream, &counter) {
                eprintln!("remus-guest: connection: {e}");
            }
        });
    }
    Ok(())
}

fn connection(stream: TcpStream, counter: &Counter) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        line.clear();
        let n = (&mut input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_LINE {
                out.write_all(b"err request line too long\n")?;
            }
            // Over-long line or EOF in the middle of a line: nothing more to answer.
            return Ok(());
        }
        let reply = answer(counter, &String::from_utf8_lossy(&line));
        out.write_all(format!("{reply}\n").as_bytes())?;
    }
}
