"""The request type -> handler table the sessions dispatch on."""

from __future__ import annotations

from typing import Any

from agentiso.protocol import guest as gp

from . import execs, files, identity, jobs, system, transfers
from .connection import Handler

HANDLERS: dict[type[Any], Handler] = {
    gp.Ping: system.handle_ping,
    gp.Exec: execs.handle_exec,
    gp.JobStart: jobs.handle_start,
    gp.JobPoll: jobs.handle_poll,
    gp.JobKill: jobs.handle_kill,
    gp.JobList: jobs.handle_list,
    gp.JobForget: jobs.handle_forget,
    gp.FileRead: files.handle_read,
    gp.FileWrite: files.handle_write,
    gp.FileStat: files.handle_stat,
    gp.ListDir: files.handle_list,
    gp.FileRemove: files.handle_remove,
    gp.MakeDir: files.handle_mkdir,
    gp.Download: transfers.handle_download,
    gp.UploadBegin: transfers.handle_upload,
    gp.SetHostname: system.handle_hostname,
    gp.ConfigureNetwork: system.handle_network,
    gp.Reidentify: identity.handle_reidentify,
    gp.Sync: system.handle_sync,
    gp.Freeze: system.handle_freeze,
    gp.Thaw: system.handle_thaw,
    gp.SetEnv: system.handle_set_env,
    gp.Shutdown: system.handle_shutdown,
}
