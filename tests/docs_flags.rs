//! Every `istio-csr-rs` command line the documentation shows must use flags the binary has.
//!
//! The check reads README.md, docs/*.md, deploy/**/*.md and charts/istio-csr-rs/README.md,
//! looks only inside fenced code blocks, and only at the commands that run istio-csr-rs
//! (`istio-csr-rs serve|request|bench ...`, `target/release/istio-csr-rs ...`,
//! `cargo run ... -- serve ...`, or anything after `--` such as `kubectl exec ... --
//! istio-csr-rs serve ...`). Flags of other programs on the same line (after `|`, `&&`, `;`, ...)
//! and flags named in prose or tables are not checked: the migration guide's tables name
//! istio-csr flags that this binary does not have, on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_istio-csr-rs");
const BIN_NAME: &str = "istio-csr-rs";

/// One run of istio-csr-rs found in a code block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Invocation {
    /// 1-based line of the command's first word.
    line: usize,
    /// `serve`, `request`, `bench`, ... or `None` for the bare binary (`istio-csr-rs --help`).
    subcommand: Option<String>,
    /// Every `--flag` of the command, with the 1-based line it is on.
    flags: Vec<(usize, String)>,
}

/// A word of a shell line with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word {
        text: String,
        line: usize,
    },
    /// `|`, `||`, `&&`, `;`, `&`, `(`, `)`, `$(`, a backquote: the end of one simple command.
    Separator,
}

/// Lines with their 1-based line numbers.
type NumberedLines = Vec<(usize, String)>;

/// A fenced code block being read: its fence (```` ``` ```` or `~~~`, at least 3 long) and lines.
struct OpenFence {
    fence: char,
    len: usize,
    lines: NumberedLines,
}

/// The lines of every fenced code block, with their 1-based line numbers.
fn code_block_lines(text: &str) -> Vec<NumberedLines> {
    let mut blocks = Vec::new();
    let mut open: Option<OpenFence> = None;
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        let fence_char = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let fence_len = fence_char.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match open.as_mut() {
            None => {
                if let Some(fence) = fence_char.filter(|_| fence_len >= 3) {
                    open = Some(OpenFence {
                        fence,
                        len: fence_len,
                        lines: Vec::new(),
                    });
                }
            }
            Some(block) => {
                let closes = fence_char == Some(block.fence)
                    && fence_len >= block.len
                    && trimmed[fence_len..].trim().is_empty();
                if closes {
                    if let Some(block) = open.take() {
                        blocks.push(block.lines);
                    }
                } else {
                    block.lines.push((index + 1, raw.to_string()));
                }
            }
        }
    }
    // An unclosed block runs to the end of the file, as in CommonMark.
    if let Some(block) = open {
        blocks.push(block.lines);
    }
    blocks
}

/// Splits a code block into logical shell lines (joining `\` continuations), each tokenized.
/// Comments are dropped, a `$ ` prompt is removed, and heredoc bodies (data, not commands) are
/// skipped.
fn logical_lines(block: &[(usize, String)]) -> Vec<Vec<Token>> {
    let mut out = Vec::new();
    let mut current: Vec<Token> = Vec::new();
    let mut heredoc_end: Option<String> = None;
    for (line_no, raw) in block {
        if let Some(end) = &heredoc_end {
            if raw.trim() == end {
                heredoc_end = None;
            }
            continue;
        }
        let mut text = raw.trim_start();
        if current.is_empty() {
            if let Some(rest) = text.strip_prefix("$ ") {
                text = rest;
            }
        }
        let (body, continued) = match text.trim_end().strip_suffix('\\') {
            Some(body) => (body, true),
            None => (text, false),
        };
        let (tokens, heredoc) = tokenize(body, *line_no);
        current.extend(tokens);
        if heredoc.is_some() {
            heredoc_end = heredoc;
        }
        if !continued || heredoc_end.is_some() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A small shell tokenizer: quotes, backslash escapes, comments and command separators. Also
/// returns the terminator of a heredoc started on this line (`<<EOF`, `<<-'EOF'`).
fn tokenize(line: &str, line_no: usize) -> (Vec<Token>, Option<String>) {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut heredoc = None;
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    let push_word = |tokens: &mut Vec<Token>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            tokens.push(Token::Word {
                text: std::mem::take(word),
                line: line_no,
            });
            *in_word = false;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => push_word(&mut tokens, &mut word, &mut in_word),
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    word.push(chars[i]);
                    i += 1;
                }
            }
            '\\' => {
                in_word = true;
                if i + 1 < chars.len() {
                    i += 1;
                    word.push(chars[i]);
                }
            }
            '|' | '&' | ';' | '(' | ')' | '`' => {
                push_word(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Separator);
                // `||`, `&&`, `;;`, `|&`: one separator is enough.
                while i + 1 < chars.len() && matches!(chars[i + 1], '|' | '&' | ';') {
                    i += 1;
                }
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                push_word(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Separator);
                i += 1;
            }
            '<' if chars.get(i + 1) == Some(&'<') && chars.get(i + 2) != Some(&'<') => {
                push_word(&mut tokens, &mut word, &mut in_word);
                let rest: String = chars[i + 2..].iter().collect();
                let rest = rest.trim_start_matches('-').trim_start();
                let end: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && !matches!(c, '|' | '&' | ';' | ')'))
                    .filter(|c| *c != '\'' && *c != '"')
                    .collect();
                if !end.is_empty() {
                    heredoc = Some(end);
                }
                break;
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
        i += 1;
    }
    push_word(&mut tokens, &mut word, &mut in_word);
    (tokens, heredoc)
}

fn basename(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

/// The flag name of a word (`--trust-domain=x` gives `--trust-domain`), if it is a long flag.
/// Surrounding `[` `]` (optional parts in a synopsis) are ignored.
fn flag_name(word: &str) -> Option<String> {
    let word = word.trim_start_matches(['[', '(', '{']);
    let rest = word.strip_prefix("--")?;
    if !rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    Some(format!("--{}", name.trim_end_matches('-')))
}

/// Finds the istio-csr-rs run in one simple command (the words between separators).
fn invocation_in(words: &[(String, usize)]) -> Option<Invocation> {
    let mut i = 0;
    // Environment assignments and wrappers before the program.
    loop {
        let (w, _) = words.get(i)?;
        if is_assignment(w) {
            i += 1;
        } else if matches!(
            w.as_str(),
            "sudo" | "env" | "exec" | "nohup" | "time" | "command"
        ) {
            i += 1;
            while words.get(i).is_some_and(|(w, _)| w.starts_with('-')) {
                i += 1;
            }
        } else if w == "timeout" {
            i += 1;
            while words.get(i).is_some_and(|(w, _)| w.starts_with('-')) {
                i += 1;
            }
            i += 1; // the duration
        } else {
            break;
        }
    }
    let (program, line) = words.get(i)?;
    let start = if basename(program) == BIN_NAME {
        i + 1
    } else if basename(program) == "cargo" && words.get(i + 1).is_some_and(|(w, _)| w == "run") {
        // `cargo run [cargo flags] -- <subcommand> ...`: ours only after `--`.
        i + 2 + words[i + 2..].iter().position(|(w, _)| w == "--")? + 1
    } else {
        // `kubectl exec ... -- istio-csr-rs serve ...` and the like.
        let dash = words[i..].iter().position(|(w, _)| w == "--")? + i;
        let (next, _) = words.get(dash + 1)?;
        if basename(next) != BIN_NAME {
            return None;
        }
        return invocation_in(&words[dash + 1..]);
    };
    let mut subcommand = None;
    let mut flags = Vec::new();
    for (w, l) in &words[start..] {
        if w == "--" {
            break;
        }
        if let Some(flag) = flag_name(w) {
            flags.push((*l, flag));
        } else if subcommand.is_none() && !w.starts_with('-') && flags.is_empty() {
            subcommand = Some(w.clone());
        }
    }
    Some(Invocation {
        line: *line,
        subcommand,
        flags,
    })
}

/// Every istio-csr-rs run shown in the code blocks of a Markdown text.
fn extract(markdown: &str) -> Vec<Invocation> {
    let mut found = Vec::new();
    for block in code_block_lines(markdown) {
        for tokens in logical_lines(&block) {
            for command in tokens.split(|t| *t == Token::Separator) {
                let words: Vec<(String, usize)> = command
                    .iter()
                    .filter_map(|t| match t {
                        Token::Word { text, line } => Some((text.clone(), *line)),
                        Token::Separator => None,
                    })
                    .collect();
                if let Some(inv) = invocation_in(&words) {
                    found.push(inv);
                }
            }
        }
    }
    found
}

/// The long flags a `--help` text defines (the option lines, not the prose).
fn help_flags(help: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        let t = line.trim_start();
        // clap indents option lines by 2 or 6 spaces and their descriptions by 10: a wrapped
        // description that happens to start with `--x` is prose, not an option.
        if line.len() - t.len() > 6 {
            continue;
        }
        let t = match t.strip_prefix('-') {
            // `-h, --help`
            Some(rest) if !rest.starts_with('-') => match rest.split_once(", ") {
                Some((_, after)) => after,
                None => continue,
            },
            Some(_) => t,
            None => continue,
        };
        if let Some(flag) = t.split_whitespace().next().and_then(flag_name) {
            flags.insert(flag);
        }
    }
    flags
}

/// The subcommands the top-level `--help` lists.
fn help_subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// What is wrong with the invocations of one file, as `file:line: message` lines.
fn problems(
    file: &str,
    invocations: &[Invocation],
    top_level: &BTreeSet<String>,
    subcommands: &BTreeSet<String>,
    flags_of: &mut dyn FnMut(&str) -> BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for inv in invocations {
        let (shown, known) = match &inv.subcommand {
            Some(sub) if sub == "help" => continue,
            Some(sub) if subcommands.contains(sub) => {
                (format!("istio-csr-rs {sub}"), flags_of(sub))
            }
            Some(sub) => {
                out.push(format!(
                    "{file}:{}: `istio-csr-rs {sub}`: there is no subcommand `{sub}` (have: {})",
                    inv.line,
                    subcommands.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
                continue;
            }
            None => ("istio-csr-rs".to_string(), top_level.clone()),
        };
        for (line, flag) in &inv.flags {
            if !known.contains(flag) {
                out.push(format!(
                    "{file}:{line}: `{shown}` has no flag {flag} (not in `{shown} --help`)"
                ));
            }
        }
    }
    out
}

fn run_help(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running {BIN} {args:?} --help: {e}"));
    assert!(
        out.status.success(),
        "{BIN} {args:?} --help failed: {out:?}"
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// README.md, docs/*.md, deploy/**/*.md and the chart's README, relative to the crate root.
fn documentation_files(root: &Path) -> Vec<PathBuf> {
    fn markdown_under(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                if recursive {
                    markdown_under(&path, true, out);
                }
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut files = vec![root.join("README.md")];
    markdown_under(&root.join("docs"), false, &mut files);
    markdown_under(&root.join("deploy"), true, &mut files);
    let chart_readme = root.join("charts/istio-csr-rs/README.md");
    if chart_readme.exists() {
        files.push(chart_readme);
    }
    files
}

#[test]
fn every_documented_command_line_uses_existing_flags() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let top_help = run_help(&[]);
    let top_level = help_flags(&top_help);
    let subcommands = help_subcommands(&top_help);
    assert!(
        subcommands.contains("serve") && subcommands.contains("request"),
        "could not read the subcommands from `istio-csr-rs --help`:\n{top_help}"
    );
    let mut cache: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut flags_of = |sub: &str| {
        cache
            .entry(sub.to_string())
            .or_insert_with(|| help_flags(&run_help(&[sub])))
            .clone()
    };
    assert!(
        flags_of("serve").contains("--trust-domain"),
        "could not read the flags from `istio-csr-rs serve --help`"
    );

    let mut all_problems = Vec::new();
    let mut checked = 0;
    for path in documentation_files(root) {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let shown = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let invocations = extract(&text);
        for inv in &invocations {
            eprintln!(
                "{shown}:{}: istio-csr-rs {} {}",
                inv.line,
                inv.subcommand.as_deref().unwrap_or(""),
                inv.flags
                    .iter()
                    .map(|(_, f)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        checked += invocations.len();
        all_problems.extend(problems(
            &shown,
            &invocations,
            &top_level,
            &subcommands,
            &mut flags_of,
        ));
    }
    assert!(
        checked > 0,
        "no istio-csr-rs command line found in the documentation: the extractor is broken"
    );
    assert!(
        all_problems.is_empty(),
        "documented istio-csr-rs command lines use flags the binary does not have:\n  {}",
        all_problems.join("\n  ")
    );
}

// The extractor itself, so that the check above can fail.

const SAMPLE: &str = r#"# Sample

Prose naming `istio-csr-rs serve --prose-only` is not a command, and neither is a table:

| istio-csr flag | ours |
|---|---|
| `--readiness-probe-port` | none |

```sh
istio-csr-rs serve --trust-domain example.org --no-such-flag=1 | openssl x509 -noout --text
# istio-csr-rs serve --commented-out
kubectl -n cert-manager get pods --all-namespaces && target/release/istio-csr-rs request \
    --root-cert root.pem \
    --bogus-request-flag
ISTIO_CSR_LOG_LEVEL=debug cargo run --release -- serve --standalone [--root-ca-file x.pem]
cargo run --release --bin other-tool
kubectl exec deploy/x -- istio-csr-rs bench --concurrency 4 --kubectl-flag-lookalike
cat <<EOF | kubectl apply -f -
istio-csr-rs serve --inside-heredoc
EOF
helm install x chart --set app.extraArgs={--not-ours}
```

  - in a list:

    ```console
    $ istio-csr-rs serve \
        --indented-flag
    ```
"#;

fn flags(inv: &Invocation) -> Vec<&str> {
    inv.flags.iter().map(|(_, f)| f.as_str()).collect()
}

#[test]
fn extractor_finds_only_the_flags_of_istio_csr_rs_in_code_blocks() {
    let found = extract(SAMPLE);
    let summary: Vec<(usize, Option<&str>, Vec<&str>)> = found
        .iter()
        .map(|i| (i.line, i.subcommand.as_deref(), flags(i)))
        .collect();
    assert_eq!(
        summary,
        vec![
            (10, Some("serve"), vec!["--trust-domain", "--no-such-flag"]),
            (
                12,
                Some("request"),
                vec!["--root-cert", "--bogus-request-flag"]
            ),
            (15, Some("serve"), vec!["--standalone", "--root-ca-file"]),
            (
                17,
                Some("bench"),
                vec!["--concurrency", "--kubectl-flag-lookalike"]
            ),
            (27, Some("serve"), vec!["--indented-flag"]),
        ]
    );
    // Continuation lines keep their own line numbers, for the error message.
    assert_eq!(found[1].flags[1], (14, "--bogus-request-flag".to_string()));
}

#[test]
fn a_flag_the_binary_lacks_is_reported_with_file_line_and_flag() {
    let found = extract(SAMPLE);
    let subcommands: BTreeSet<String> = ["serve", "request", "bench"].map(String::from).into();
    let mut flags_of = |sub: &str| -> BTreeSet<String> {
        match sub {
            "serve" => ["--trust-domain", "--standalone", "--root-ca-file"].as_slice(),
            "request" => ["--root-cert"].as_slice(),
            _ => ["--concurrency"].as_slice(),
        }
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let got = problems(
        "docs/x.md",
        &found,
        &BTreeSet::new(),
        &subcommands,
        &mut flags_of,
    );
    assert_eq!(
        got,
        vec![
            "docs/x.md:10: `istio-csr-rs serve` has no flag --no-such-flag (not in `istio-csr-rs serve --help`)",
            "docs/x.md:14: `istio-csr-rs request` has no flag --bogus-request-flag (not in `istio-csr-rs request --help`)",
            "docs/x.md:17: `istio-csr-rs bench` has no flag --kubectl-flag-lookalike (not in `istio-csr-rs bench --help`)",
            "docs/x.md:28: `istio-csr-rs serve` has no flag --indented-flag (not in `istio-csr-rs serve --help`)",
        ]
    );
}

#[test]
fn an_unknown_subcommand_is_reported() {
    let found = extract("```\nistio-csr-rs serv --trust-domain x\n```\n");
    let subcommands: BTreeSet<String> = ["serve"].map(String::from).into();
    let got = problems(
        "README.md",
        &found,
        &BTreeSet::new(),
        &subcommands,
        &mut |_| BTreeSet::new(),
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("README.md:2: `istio-csr-rs serv`"),
        "{got:?}"
    );
}

#[test]
fn help_flags_reads_option_lines_only() {
    let help = [
        "Usage: x serve [OPTIONS]",
        "",
        "Options:",
        "      --trust-domain <TRUST_DOMAIN>",
        "          Trust domain; see also --not-an-option and the wrapped",
        "          --wrapped-mention [default: x]",
        "  -h, --help",
        "          Print help",
    ]
    .join("\n");
    let got = help_flags(&help);
    assert_eq!(got, ["--help", "--trust-domain"].map(String::from).into());
}
