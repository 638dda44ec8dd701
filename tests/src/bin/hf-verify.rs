//! hf-verify: a writer/verifier for crash tests. Threads do O_DIRECT writes
//! of self-describing 4 KiB blocks (each thread owns every T-th block, so a
//! block never has two writes in flight) and read back blocks as they go;
//! at the end every block is read and must hold its last acknowledged
//! write. Any I/O error or mismatch fails the run.
//!
//! Prints one JSON report line and exits 0 only if there were no errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast_tests::pattern::{self, BLOCK};
use holdfast_tests::{AlignedBuf, Rng, open_direct};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    file: PathBuf,
    blocks: u64,
    threads: u64,
    seconds: f64,
    seed: u64,
    state: Option<PathBuf>,
    check: Option<PathBuf>,
    read_every: u64,
}

fn val(p: &mut lexopt::Parser) -> String {
    p.value().unwrap().into_string().unwrap()
}

fn parse() -> Args {
    use lexopt::prelude::*;
    let mut a = Args {
        file: PathBuf::new(),
        blocks: 0,
        threads: 4,
        seconds: 5.0,
        seed: 1,
        state: None,
        check: None,
        read_every: 8,
    };
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next().unwrap() {
        match arg {
            Long("file") => a.file = val(&mut p).into(),
            Long("blocks") => a.blocks = val(&mut p).parse().unwrap(),
            Long("threads") => a.threads = val(&mut p).parse().unwrap(),
            Long("seconds") => a.seconds = val(&mut p).parse().unwrap(),
            Long("seed") => a.seed = val(&mut p).parse().unwrap(),
            Long("state") => a.state = Some(val(&mut p).into()),
            Long("check") => a.check = Some(val(&mut p).into()),
            Long("read-every") => a.read_every = val(&mut p).parse().unwrap(),
            other => panic!("hf-verify: {}", other.unexpected()),
        }
    }
    a
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    reads: AtomicU64,
    errors: AtomicU64,
    verify_failures: AtomicU64,
    max_write_us: AtomicU64,
}

fn report_error(c: &Counters, msg: String) {
    if c.errors.fetch_add(1, Ordering::SeqCst) < 10 {
        eprintln!("hf-verify: {msg}");
    }
}

fn report_mismatch(c: &Counters, msg: String) {
    if c.verify_failures.fetch_add(1, Ordering::SeqCst) < 10 {
        eprintln!("hf-verify: {msg}");
    }
}

fn verify_all(file: &File, seed: u64, gens: &[u64], c: &Counters) {
    const BATCH: usize = 64;
    let mut buf = AlignedBuf::new(BATCH * BLOCK);
    for (chunk_no, chunk) in gens.chunks(BATCH).enumerate() {
        let first = (chunk_no * BATCH) as u64;
        let len = chunk.len() * BLOCK;
        if let Err(e) = file.read_exact_at(&mut buf[..len], first * BLOCK as u64) {
            report_error(c, format!("final read at block {first}: {e}"));
            continue;
        }
        for (i, g) in chunk.iter().enumerate() {
            let b = first + i as u64;
            if let Err(m) = pattern::check(&buf[i * BLOCK..(i + 1) * BLOCK], seed, b, *g) {
                report_mismatch(c, format!("final verify: {m}"));
            }
        }
    }
}

fn main() {
    let a = parse();
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let file = Arc::new(open_direct(&a.file));
    let size = file.metadata().unwrap().len();
    let blocks = if a.blocks == 0 {
        size / BLOCK as u64
    } else {
        a.blocks.min(size / BLOCK as u64)
    };
    let counters = Arc::new(Counters::default());

    if let Some(state) = &a.check {
        let gens: Vec<u64> = std::fs::read_to_string(state)
            .unwrap()
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        verify_all(&file, a.seed, &gens, &counters);
        return finish(&counters, gens.len() as u64, 0.0);
    }

    let gens = Arc::new(Mutex::new(vec![0u64; blocks as usize]));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.seconds);
    let threads: Vec<_> = (0..a.threads)
        .map(|t| {
            let (file, gens, c) = (file.clone(), gens.clone(), counters.clone());
            let (seed, threads, read_every) = (a.seed, a.threads, a.read_every.max(1));
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (t + 1).wrapping_mul(0x9e37_79b9));
                let mut buf = AlignedBuf::new(BLOCK);
                let owned = (blocks + threads - 1 - t) / threads;
                if owned == 0 {
                    return;
                }
                let mut n = 0u64;
                while !STOP.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let block = t + threads * rng.range(0, owned);
                    let generation = gens.lock().unwrap()[block as usize] + 1;
                    pattern::fill(&mut buf, seed, block, generation);
                    let t0 = Instant::now();
                    match file.write_at(&buf, block * BLOCK as u64) {
                        Ok(BLOCK) => {
                            gens.lock().unwrap()[block as usize] = generation;
                            c.writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(k) => {
                            report_error(&c, format!("short write of {k} bytes at block {block}"))
                        }
                        Err(e) => report_error(&c, format!("write at block {block}: {e}")),
                    }
                    let us = t0.elapsed().as_micros() as u64;
                    c.max_write_us.fetch_max(us, Ordering::Relaxed);
                    n += 1;
                    if n.is_multiple_of(read_every) {
                        let block = t + threads * rng.range(0, owned);
                        let want = gens.lock().unwrap()[block as usize];
                        match file.read_exact_at(&mut buf, block * BLOCK as u64) {
                            Ok(()) => {
                                c.reads.fetch_add(1, Ordering::Relaxed);
                                if let Err(m) = pattern::check(&buf, seed, block, want) {
                                    report_mismatch(&c, format!("read-back: {m}"));
                                }
                            }
                            Err(e) => report_error(&c, format!("read at block {block}: {e}")),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let gens = gens.lock().unwrap().clone();
    verify_all(&file, a.seed, &gens, &counters);
    if let Some(state) = &a.state {
        let text: Vec<String> = gens.iter().map(u64::to_string).collect();
        std::fs::write(state, text.join("\n")).unwrap();
    }
    finish(&counters, blocks, elapsed);
}

fn finish(c: &Counters, blocks: u64, seconds: f64) {
    let errors = c.errors.load(Ordering::SeqCst);
    let failures = c.verify_failures.load(Ordering::SeqCst);
    println!(
        "{{\"blocks\":{blocks},\"writes\":{},\"reads\":{},\"errors\":{errors},\"verify_failures\":{failures},\"max_write_ms\":{:.3},\"seconds\":{seconds:.3}}}",
        c.writes.load(Ordering::SeqCst),
        c.reads.load(Ordering::SeqCst),
        c.max_write_us.load(Ordering::SeqCst) as f64 / 1000.0,
    );
    std::process::exit(if errors == 0 && failures == 0 { 0 } else { 1 });
}
