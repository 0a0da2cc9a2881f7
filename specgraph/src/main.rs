//! `specvm-graph [--name NAME] FILE... -o PAGE.html [--force] [--title T]`
//!
//! Reads event streams (files of JSON lines, `-` for stdin): one per
//! bridge, each a lane, and any number of VMM event streams, which
//! annotate (rollbacks, joins, outcomes). Writes one self-contained HTML
//! page. Malformed lines are skipped, counted on stderr and in the page.
//! `docs/graph.md` has the rest.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use specgraph::live::{self, Live, Wake};
use specgraph::model::{build, Input, Outcome};
use specgraph::parse::{read_stream, Parsed};
use specgraph::render::page;
use specgraph::write::{check_target, write_durably};

#[derive(Parser, Debug)]
#[command(
    name = "specvm-graph",
    version,
    about = "Draws the speculation graph of netbridge (and specvm) event streams as one HTML page"
)]
struct Args {
    /// Event streams of JSON lines: files (a bridge's stdout, a VMM's
    /// `ctl events`), a bridge's `--events` socket (read from now until it
    /// closes or Ctrl-C), or `-` for stdin.
    #[arg(required = true, value_name = "FILE")]
    inputs: Vec<PathBuf>,
    /// Names the FILE that follows it (the lane's name); without it a
    /// file is named after its file name, and `-` is `stdin`.
    #[arg(long, value_name = "NAME")]
    name: Vec<String>,
    /// The page to write.
    #[arg(short, long, value_name = "PAGE")]
    output: PathBuf,
    /// Replace PAGE if it exists (it must be a regular file).
    #[arg(long)]
    force: bool,
    /// The page's title.
    #[arg(long, default_value = "Speculation graph")]
    title: String,
}

fn main() -> ExitCode {
    let matches = match Args::command().try_get_matches() {
        Ok(m) => m,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&first_line(&e)),
    };
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => return fail(&first_line(&e)),
    };
    let input_at: Vec<usize> = matches
        .indices_of("inputs")
        .map(Iterator::collect)
        .unwrap_or_default();
    let name_at: Vec<usize> = matches
        .indices_of("name")
        .map(Iterator::collect)
        .unwrap_or_default();
    let names = match names(&args.inputs, &input_at, &args.name, &name_at) {
        Ok(n) => n,
        Err(e) => return fail(&e),
    };
    match run(&args, names) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("specvm-graph: error: {msg}");
    ExitCode::FAILURE
}

fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_start().strip_prefix("error:").unwrap_or(&text);
    let first = text.split("\n\n").next().unwrap_or_default();
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Each input's name: the `--name` just before it on the command line,
/// else its file name (`stdin` for `-`). Two inputs of one name get
/// ` (2)`, ` (3)`... so lanes stay apart.
fn names(
    inputs: &[PathBuf],
    input_at: &[usize],
    given: &[String],
    name_at: &[usize],
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut used = vec![false; given.len()];
    for (i, path) in inputs.iter().enumerate() {
        let at = input_at.get(i).copied().unwrap_or(usize::MAX);
        let before = if i == 0 {
            0
        } else {
            input_at.get(i - 1).copied().unwrap_or(0)
        };
        // The last --name between the previous input and this one.
        let named = name_at
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n < at && (i == 0 || n > before))
            .map(|(k, _)| k)
            .next_back();
        let name = match named {
            Some(k) => {
                used[k] = true;
                given[k].clone()
            }
            None if path.as_os_str() == "-" => "stdin".to_string(),
            None => path.file_name().map_or_else(
                || path.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            ),
        };
        let mut unique = name.clone();
        let mut k = 2;
        while out.contains(&unique) {
            unique = format!("{name} ({k})");
            k += 1;
        }
        out.push(unique);
    }
    match used.iter().position(|u| !u) {
        Some(k) => Err(format!("--name {} names no FILE after it", given[k])),
        None => Ok(out),
    }
}

fn run(args: &Args, names: Vec<String>) -> Result<(), String> {
    if args.inputs.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        return Err("stdin (-) can be read only once".into());
    }
    check_target(&args.output, args.force).map_err(|e| e.to_string())?;
    let mut parsed = Vec::new();
    let mut notes = Vec::new();
    let mut live = Vec::new();
    // Regular files first; then the live inputs, all at once.
    for (i, path) in args.inputs.iter().enumerate() {
        match live::classify(path) {
            Some(l) => {
                live.push((i, l));
                parsed.push(Parsed::default());
            }
            None => {
                parsed.push(read(path).map_err(|e| format!("reading {}: {e}", path.display()))?)
            }
        }
    }
    if !live.is_empty() {
        let sources: Vec<Live> = live.iter().map(|(_, l)| l.clone()).collect();
        let readers = live::open(&sources)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut signals =
            Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("setting up Ctrl-C: {e}"))?;
        let stop = tx.clone();
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                let _ = stop.send(Wake::Stop);
            }
        });
        if sources.iter().any(|l| matches!(l, Live::Socket(_))) {
            eprintln!(
                "specvm-graph: reading the event sockets from now on; Ctrl-C (or SIGTERM) draws what came"
            );
        }
        let got = live::read_all(readers, &tx, &rx);
        for ((i, _), c) in live.iter().zip(got) {
            let name = &names[*i];
            if c.cut > 0 {
                notes.push(format!(
                    "{name}: {} bytes past the first {} MiB were not kept.",
                    c.cut,
                    live::KEEP_MAX >> 20
                ));
            }
            if let Some(e) = c.error {
                notes.push(format!("{name}: reading it ended with an error: {e}."));
            }
            parsed[*i] = read_stream(&c.bytes[..]).map_err(|e| e.to_string())?;
        }
    }
    let mut inputs = Vec::new();
    for (parsed, name) in parsed.into_iter().zip(names) {
        if parsed.malformed > 0 {
            let first = parsed
                .examples
                .first()
                .map(|m| format!("; the first, line {}: {}", m.line, m.reason))
                .unwrap_or_default();
            eprintln!(
                "specvm-graph: {name}: {} malformed lines skipped{first}",
                parsed.malformed
            );
        }
        inputs.push(Input { name, parsed });
    }
    let mut graph = build(&inputs);
    for n in &notes {
        eprintln!("specvm-graph: {n}");
    }
    graph.notes = notes;
    for n in graph.unknown.iter().map(|(k, n)| format!("{k} ×{n}")) {
        eprintln!("specvm-graph: events of a kind not drawn: {n}");
    }
    if graph.lagged > 0 {
        eprintln!(
            "specvm-graph: the bridges dropped {} events for a slow reader",
            graph.lagged
        );
    }
    let html = page(&graph, &args.title);
    write_durably(&args.output, html.as_bytes(), args.force).map_err(|e| e.to_string())?;
    println!(
        "wrote {}: {} speculations ({} committed, {} aborted, {} open), {} joins, {} bridges, {} malformed lines skipped",
        args.output.display(),
        graph.specs.len(),
        graph.count(Outcome::Committed),
        graph.count(Outcome::Aborted),
        graph.count(Outcome::Open),
        graph.joins.len(),
        graph.lanes.len(),
        graph.malformed(),
    );
    Ok(())
}

/// Reads a regular file (live inputs are read by `live`).
fn read(path: &Path) -> std::io::Result<Parsed> {
    let file = std::fs::File::open(path)?;
    if file.metadata()?.is_dir() {
        return Err(std::io::Error::other("is a directory"));
    }
    read_stream(BufReader::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<(Args, Vec<String>), String> {
        let m = Args::command()
            .try_get_matches_from(argv)
            .map_err(|e| first_line(&e))?;
        let a = Args::from_arg_matches(&m).map_err(|e| first_line(&e))?;
        let ia: Vec<usize> = m
            .indices_of("inputs")
            .map(Iterator::collect)
            .unwrap_or_default();
        let na: Vec<usize> = m
            .indices_of("name")
            .map(Iterator::collect)
            .unwrap_or_default();
        let n = names(&a.inputs, &ia, &a.name, &na)?;
        Ok((a, n))
    }

    #[test]
    fn a_name_names_the_file_after_it() {
        let (_, n) = parse(&[
            "g",
            "-o",
            "x.html",
            "--name",
            "A",
            "a.jsonl",
            "dir/b.jsonl",
            "--name",
            "C",
            "-",
        ])
        .expect("good");
        assert_eq!(n, ["A", "b.jsonl", "C"]);
        let (_, n) = parse(&["g", "a/ev", "b/ev", "-", "-o", "x"]).expect("good");
        assert_eq!(n, ["ev", "ev (2)", "stdin"]);
        let e = parse(&["g", "a", "--name", "late", "-o", "x"]).expect_err("dangling");
        assert!(e.contains("--name late names no FILE"), "{e}");
        assert!(parse(&["g", "-o", "x"]).is_err());
    }
}
