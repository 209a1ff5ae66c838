"""The pure half of the git tools (frontend/gitcmd.py), exec_parallel's
planning and workspace_prepare's argument record: every validation rule is
tried with input meant to break it; the parsers read real git output (made
by the host's git in a temporary repository) as well as hand-written records.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agentiso.frontend import gitcmd
from agentiso.frontend.config import parse_config
from agentiso.frontend.gitcmd import GitArgError
from agentiso.frontend.gitops import hint_for
from agentiso.frontend.golden import changed_keys, prepare_args
from agentiso.frontend.merge import MergeRefused, check_sources, shared_commit
from agentiso.frontend.results_git import ParallelItem
from agentiso.frontend.toolerrors import BadArgument
from agentiso.frontend.tools_parallel import plan_commands, summarize

# --- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize("url,scheme,host,port", [
    ("https://example.com/org/repo.git", "https", "example.com", None),
    ("https://user:tok@example.com:8443/r.git", "https", "example.com", 8443),
    ("ssh://git@example.com:2222/r.git", "ssh", "example.com", 2222),
    ("git@example.com:org/repo.git", "ssh", "example.com", None),
    ("git://198.51.100.2/repo.git", "git", "198.51.100.2", None),
    ("git://198.51.100.2:9419/repo.git", "git", "198.51.100.2", 9419),
])
def test_allowed_urls(url: str, scheme: str, host: str, port: int | None) -> None:
    u = gitcmd.check_url(url)
    assert (u.scheme, u.host, u.port) == (scheme, host, port)
    assert "tok" not in u.shown


@pytest.mark.parametrize("url,words", [
    ("ext::sh -c touch% /tmp/pwned", "remote helper"),
    ("ext::sh", "remote helper"),
    ("fd::3", "remote helper"),
    ("https://example.com/r.git;touch /tmp/x", "not allowed"),
    ("https://example.com/$(id).git", "not allowed"),
    ("https://example.com/`id`.git", "not allowed"),
    ("https://example.com/r.git|id", "not allowed"),
    ("https://example.com/r.git&&id", "not allowed"),
    ("https://example.com/r\n.git", "not allowed"),
    ("--upload-pack=touch /tmp/x", "starts with '-'"),
    ("-u", "starts with '-'"),
    ("file:///etc", "scheme 'file'"),
    ("ftp://example.com/r.git", "scheme 'ftp'"),
    ("/root/repo", "not a URL"),
    ("repo", "not a URL"),
    ("https:///nohost", "no usable host"),
    ("https://-oProxyCommand=x/r", "no usable host"),
    ("https://example.com:99999/r", "invalid port"),
    ("", "empty"),
])
def test_hostile_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(GitArgError) as err:
        gitcmd.check_url(url)
    assert words in str(err.value)
    assert len(str(err.value).splitlines()) == 2


def test_file_urls_only_where_the_config_allows_them() -> None:
    with pytest.raises(GitArgError, match="file:// only where the config allows it"):
        gitcmd.check_url("file:///srv/repo.git")
    assert gitcmd.check_url("file:///srv/repo.git", allow_file=True).scheme == "file"
    assert parse_config("").limits.git_allow_file_urls is False
    assert parse_config("[limits]\ngit_allow_file_urls = true\n").limits.git_allow_file_urls


def test_credentials_are_never_shown_in_a_refusal() -> None:
    with pytest.raises(GitArgError) as err:
        gitcmd.check_url("ftp://alice:hunter2@example.com/r.git")
    assert "hunter2" not in str(err.value) and "alice" not in str(err.value)


# --- redaction ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,secret", [
    ("To https://alice:s3cr3tpass@git.example.com/r.git", "s3cr3tpass"),
    ("fatal: unable to access 'https://x-access-token:ghs_abcdefghijklmnopqrstuvwxyz0123@h/'",
     "ghs_abcdefghijklmnopqrstuvwxyz0123"),
    ("remote: your token ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 expires", "ghp_ABCDEFGH"),
    ("remote: github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github_pat_11ABC"),
    ("remote: glpat-abcdefghijklmnopqrst", "glpat-abcdefghij"),
    ("remote: token=supersecretvalue123", "supersecretvalue123"),
    ("remote: password: hunter2hunter2", "hunter2hunter2"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("key AKIAABCDEFGHIJKLMNOP used", "AKIAABCDEFGHIJKLMNOP"),
    ("ssh://deploy:pw123456@host/r.git", "pw123456"),
])
def test_redact_removes_credentials(text: str, secret: str) -> None:
    out = gitcmd.redact(text)
    assert secret not in out and gitcmd.REDACTED in out


def test_redact_removes_a_urls_credentials_wherever_git_echoes_them() -> None:
    url = "https://bob:ghp%5FSECRET123@198.51.100.2/repo.git"
    secrets = gitcmd.url_secrets(url)
    assert set(secrets) >= {"ghp%5FSECRET123", "ghp_SECRET123", "bob:ghp%5FSECRET123"}
    said = "fatal: unable to look up bob:ghp_SECRET123@198.51.100.2 (port 9418)"
    out = gitcmd.redact(said, secrets)
    assert "SECRET" not in out and "bob" not in out and "198.51.100.2" in out
    assert "SECRET" not in gitcmd.check_url(url).shown
    # A token given as the https user name is a secret; ssh's "git@" is not.
    assert gitcmd.url_secrets("https://ghp_tokenonly123@h/r.git") == ("ghp_tokenonly123",)
    assert gitcmd.url_secrets("ssh://git@h/r.git") == ()
    assert gitcmd.url_secrets("git@h:r.git") == ()
    assert gitcmd.redact("git clone failed", gitcmd.url_secrets("ssh://git@h/r")) == (
        "git clone failed")


def test_git_urls_with_credentials_are_refused_without_echoing_them() -> None:
    with pytest.raises(GitArgError) as err:
        gitcmd.check_url("git://bob:hunter2secret@198.51.100.2/repo.git")
    assert "hunter2secret" not in str(err.value) and "carries credentials" in str(err.value)


def test_redact_keeps_ordinary_output() -> None:
    text = ("To git://198.51.100.2/repo.git\n=\trefs/heads/main:refs/heads/main\t[up to date]\n"
            "Done\n 1 file changed, 2 insertions(+)")
    assert gitcmd.redact(text) == text


# --- paths, refs, authors ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/root/repo", "/srv/a-b/c_d.git", "/root/repo/"])
def test_repo_paths(path: str) -> None:
    assert gitcmd.check_repo_path(path) == path.rstrip("/")


@pytest.mark.parametrize("path", [
    "root/repo", "/", "/root/../etc", "/root/repo/..", "/root/./repo", "//root/repo",
    "/root//repo", "/root/re\npo", "/root/\x00x", "-C", "/" + "a" * 1100,
])
def test_repo_paths_that_escape_or_confuse_are_refused(path: str) -> None:
    with pytest.raises(GitArgError):
        gitcmd.check_repo_path(path)


@pytest.mark.parametrize("fp", ["../etc/passwd", "a/../../x", "/etc/passwd", "-p",
                                "--output=/tmp/x", "a\nb", ".."])
def test_file_paths_that_leave_the_repository_are_refused(fp: str) -> None:
    with pytest.raises(GitArgError):
        gitcmd.check_file_path(fp)
    with pytest.raises(GitArgError):
        gitcmd.diff_argv("/r", staged=False, stat=False, file_path=fp)


def test_diff_argv_puts_the_path_after_double_dash() -> None:
    argv = gitcmd.diff_argv("/r", staged=True, stat=True, file_path="src/a.py")
    assert argv[-2:] == ["--", "src/a.py"] and "--cached" in argv and "--numstat" in argv


@pytest.mark.parametrize("ref", ["-f", "--force", "a..b", "a@{1}", "x.lock", "a/", "a b",
                                 "a;b", "", "a//b", "a/.b"])
def test_bad_branch_names_are_refused(ref: str) -> None:
    with pytest.raises(GitArgError):
        gitcmd.check_ref(ref)


@pytest.mark.parametrize("remote", ["-u", "--mirror", "a b", "https://x/y", "a;b", ""])
def test_bad_remote_names_are_refused(remote: str) -> None:
    with pytest.raises(GitArgError):
        gitcmd.push_argv("/r", remote=remote, branch=None, force=False, set_upstream=False)


@pytest.mark.parametrize("author", ["nobody", "A <a@b> --amend", "<a@b>", "A\n<a@b>",
                                    "A <a b@c>"])
def test_bad_authors_are_refused(author: str) -> None:
    with pytest.raises(GitArgError):
        gitcmd.commit_argv("/r", author=author)


def test_every_argv_allows_only_the_listed_transports() -> None:
    argv = gitcmd.clone_argv(gitcmd.check_url("git://h/r"), "/r", branch="main", depth=1)
    i = argv.index("protocol.allow=never")
    assert argv[i - 1] == "-c"
    allowed = {a for a in argv if a.startswith("protocol.") and a.endswith("=always")}
    assert allowed == {"protocol.https.allow=always", "protocol.ssh.allow=always",
                       "protocol.git.allow=always"}
    assert argv[-3:] == ["--", "git://h/r", "/r"]
    push = gitcmd.push_argv("/r", remote="origin", branch="main", force=True,
                            set_upstream=True)
    assert push[-3:] == ["--", "origin", "main"] and "--force" in push


# --- egress ------------------------------------------------------------------------------


def test_egress_judges_ip_literals_against_the_allow_list() -> None:
    allow = [{"cidr": "198.51.100.2/32", "protocol": "tcp", "ports": [[9418, 9418]]}]
    url = gitcmd.check_url("git://198.51.100.2/r.git")
    assert gitcmd.egress_refusal(url, allow_internet=True, allow=allow, has_peers=False) is None
    other_port = gitcmd.check_url("git://198.51.100.2:9419/r.git")
    why = gitcmd.egress_refusal(other_port, allow_internet=True, allow=allow, has_peers=False)
    assert why is not None and "9419" in why and "allow-list" in why
    other_host = gitcmd.check_url("git://203.0.113.9/r.git")
    assert gitcmd.egress_refusal(other_host, allow_internet=True, allow=allow,
                                 has_peers=False) is not None
    assert "no internet" in str(gitcmd.egress_refusal(url, allow_internet=False, allow=[],
                                                      has_peers=False))
    # What cannot be judged here is left to the network: names, peers, no allow-list.
    name = gitcmd.check_url("https://example.com/r.git")
    assert gitcmd.egress_refusal(name, allow_internet=False, allow=[], has_peers=False) is None
    assert gitcmd.egress_refusal(url, allow_internet=False, allow=[], has_peers=True) is None
    assert gitcmd.egress_refusal(other_port, allow_internet=True, allow=[],
                                 has_peers=False) is None


# --- parsers -----------------------------------------------------------------------------


def test_parse_status_records() -> None:
    out = "\0".join([
        "# branch.oid 1111111111111111111111111111111111111111",
        "# branch.head main", "# branch.upstream origin/main", "# branch.ab +2 -1",
        "1 M. N... 100644 100644 100644 aaa bbb staged.txt",
        "1 .M N... 100644 100644 100644 aaa bbb work tree.txt",
        "1 MM N... 100644 100644 100644 aaa bbb both.txt",
        "2 R. N... 100644 100644 100644 aaa bbb R100 new name.txt", "old name.txt",
        "u UU N... 100644 100644 100644 100644 a b c conflict me.txt",
        "? new file.txt", "",
    ])
    st = gitcmd.parse_status(out)
    assert (st.branch, st.upstream, st.ahead, st.behind) == ("main", "origin/main", 2, 1)
    assert st.staged == ["staged.txt", "both.txt", "new name.txt"]
    assert st.modified == ["work tree.txt", "both.txt"]
    assert st.renamed == [("old name.txt", "new name.txt")]
    assert st.conflicted == ["conflict me.txt"] and st.untracked == ["new file.txt"]
    assert st.dirty
    empty = gitcmd.parse_status("# branch.oid (initial)\0# branch.head (detached)\0")
    assert empty.commit is None and empty.branch is None and not empty.dirty


def test_parse_numstat_records() -> None:
    out = "3\t1\ta.txt\0-\t-\tbin.dat\0" + "0\t0\t\0old.txt\0new.txt\0"
    got = gitcmd.parse_numstat(out)
    assert [(f.path, f.added, f.deleted) for f in got] == [
        ("a.txt", 3, 1), ("bin.dat", None, None), ("new.txt", 0, 0)]
    assert gitcmd.parse_unmerged("b.txt\0a.txt\0a.txt\0") == ["a.txt", "b.txt"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed on this host")
def test_parsers_read_real_git_output(tmp_path: Path) -> None:
    def git(*args: str, input: bytes | None = None) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True, capture_output=True, input=input).stdout.decode()

    git("init", "-q", "-b", "main")
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "sp ace.txt").write_text("x\n")
    (tmp_path / "old.txt").write_text("rename me\n" * 5)
    git("add", "-A")
    git("commit", "-q", "-m", "base")
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "sp ace.txt").write_text("y\n")
    git("add", "sp ace.txt")
    git("mv", "old.txt", "new.txt")
    (tmp_path / "untracked.txt").write_text("u\n")
    (tmp_path / "bin.dat").write_bytes(b"\0\1\2")
    git("add", "bin.dat")
    st = gitcmd.parse_status(git("status", "--porcelain=v2", "--branch", "-z"))
    assert st.branch == "main" and st.commit and len(st.commit) == 40
    assert sorted(st.staged) == ["bin.dat", "new.txt", "sp ace.txt"]
    assert st.modified == ["a.txt"] and st.untracked == ["untracked.txt"]
    assert st.renamed == [("old.txt", "new.txt")]
    work = gitcmd.parse_numstat(git("diff", "--numstat", "-z"))
    assert [(f.path, f.added, f.deleted) for f in work] == [("a.txt", 2, 0)]
    staged = {f.path: (f.added, f.deleted)
              for f in gitcmd.parse_numstat(git("diff", "--cached", "--numstat", "-z", "-M"))}
    assert staged == {"bin.dat": (None, None), "new.txt": (0, 0), "sp ace.txt": (1, 1)}


# --- exec_parallel, workspace_prepare, workspace_merge: the pure parts ----------------------


def test_plan_commands() -> None:
    assert plan_commands(["a", "b"], "true", 20) == ["true", "true"]
    assert plan_commands(["a", "b"], ["x", "y"], 20) == ["x", "y"]
    with pytest.raises(BadArgument, match="2 commands for 3 workspaces"):
        plan_commands(["a", "b", "c"], ["x", "y"], 20)
    with pytest.raises(BadArgument, match="above the limit of 2"):
        plan_commands(["a", "b", "c"], "true", 2)
    with pytest.raises(BadArgument, match="named twice"):
        plan_commands(["a", "a"], "true", 20)
    cfg = parse_config("[limits]\nmax_parallel_workspaces = 5\nexec_parallelism = 2\n")
    assert (cfg.limits.max_parallel_workspaces, cfg.limits.exec_parallelism) == (5, 2)
    assert parse_config("").limits.max_parallel_workspaces == 20


def test_summarize_counts_successes_failures_and_errors() -> None:
    def item(ok: bool, code: int | None, error: str | None) -> ParallelItem:
        return ParallelItem(workspace="w", command="c", ok=ok, exit_code=code, timed_out=False,
                            stdout="", stderr="", stdout_encoding="utf-8",
                            stderr_encoding="utf-8", stdout_truncated=False,
                            stderr_truncated=False, duration_secs=0.1, error=error)

    s = summarize([item(True, 0, None), item(False, 1, None), item(False, None, "x\ny")], 1.5)
    assert (s.total, s.succeeded, s.failed, s.errors, s.wall_secs) == (3, 1, 1, 1, 1.5)


def test_prepare_args_keep_no_credentials_and_name_what_changed() -> None:
    kw = dict(image="dev", path="/root/repo", branch=None, setup_commands=["make"],
              allow_internet=True, allow=None)
    a = prepare_args(git_url="https://u:tok123@h/r.git", **kw)  # type: ignore[arg-type]
    assert "tok123" not in repr(a)
    b = prepare_args(git_url="https://u:tok123@h/r.git",  # type: ignore[arg-type]
                     **{**kw, "setup_commands": ["make", "make test"]})
    assert changed_keys(a, b) == ["setup_commands"]
    assert changed_keys(a, dict(a)) == []


def test_merge_sources_are_checked() -> None:
    check_sources(["a", "b"], "t")
    with pytest.raises(MergeRefused, match="twice"):
        check_sources(["a", "a"], "t")
    with pytest.raises(MergeRefused, match="also a source"):
        check_sources(["a", "t"], "t")


def test_shared_commit_is_the_newest_the_source_has() -> None:
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    out = f"{a} missing\n{b}\n{c}\n"
    assert shared_commit([a, b, c], out) == b
    assert shared_commit([a], f"{a} missing\n") is None
    assert shared_commit([], "") is None


@pytest.mark.parametrize("said,words", [
    ("fatal: not a git repository (or any of the parent directories): .git", "top directory"),
    ("fatal: unable to access 'https://h/r/': Recv failure: Connection reset by peer",
     "network_policy"),
    ("fatal: unable to access 'https://h/r/': The requested URL returned error: 403",
     "credentials"),
    ("fatal: Authentication failed for 'https://h/r/'", "credentials"),
    ("nothing to commit, working tree clean", "add_all"),
    ("! [rejected] main -> main (fetch first)", "pull or merge"),
    ("something else entirely", "Fix what git reports"),
])
def test_git_failures_get_a_hint_an_agent_can_act_on(said: str, words: str) -> None:
    assert words in hint_for(said)


def test_golden_records_in_the_catalog_go_with_their_workspace(tmp_path: Path) -> None:
    from agentiso.frontend.catalog import Catalog
    from tests.unit.test_catalog import make

    with Catalog.open(tmp_path / "catalog.db") as cat:
        rec = make(cat, "golden")
        cat.add_workspace(rec)
        assert cat.get_golden(rec.id) is None
        args = {"image": "dev", "setup_commands": ["make"], "allow": None}
        cat.set_golden(rec.id, args, "preparing")
        got = cat.get_golden(rec.id)
        assert got is not None and got["args"] == args and got["state"] == "preparing"
        cat.set_golden(rec.id, args, "ready", "c" * 40)
        got = cat.get_golden(rec.id)
        assert got is not None and (got["state"], got["commit_id"]) == ("ready", "c" * 40)
        with pytest.raises(Exception, match="CHECK"):
            cat.set_golden(rec.id, args, "half-done")
        with pytest.raises(Exception, match="FOREIGN KEY"):
            cat.set_golden("ws-0000000000", args, "ready")
        cat.delete_workspace(rec.id)
        assert cat.get_golden(rec.id) is None
