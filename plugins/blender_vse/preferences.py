"""Add-on preferences: where the server is, its CURVE keys, and a button to start a local one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import bpy

from . import options
from .operators import is_local

# Servers this Blender session started; they keep running after it quits (jobs outlive the editor).
started_servers: list[subprocess.Popen] = []


class RETALK_OT_start_local_server(bpy.types.Operator):
    """Start `retalk serve` on this machine (needs retalk installed; it keeps running after Blender quits)"""

    bl_idname = "retalk.start_local_server"
    bl_label = "Start local server"

    @classmethod
    def poll(cls, context):
        return shutil.which("retalk") is not None

    def execute(self, context):
        prefs = context.preferences.addons[__package__].preferences
        endpoint = prefs.server.strip()
        if not is_local(endpoint):
            self.report({"ERROR"}, f"{endpoint} is not on this machine; set a 127.0.0.1 or ipc:// address")
            return {"CANCELLED"}
        command = [shutil.which("retalk"), "serve", "--bind", endpoint]
        if bpy.data.filepath:  # media beside the .blend is read in place; anything else is uploaded
            command += ["--media-root", bpy.path.abspath("//")]
        detach = {"start_new_session": True} if sys.platform != "win32" else {"creationflags": 0x00000008}
        log = os.path.join(tempfile.gettempdir(), "retalk-server.log")
        with open(log, "ab") as output:
            started_servers.append(subprocess.Popen(command, stdout=output, stderr=output, **detach))
        self.report({"INFO"}, f"retalk: starting a server on {endpoint} (log: {log})")
        return {"FINISHED"}


class RetalkPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    server: bpy.props.StringProperty(
        name="Server",
        description="tcp://HOST:PORT or ipc://PATH of `retalk serve`",
        default=options.DEFAULT_SERVER,
    )
    server_key_file: bpy.props.StringProperty(
        name="Server public key",
        description="The server's *.key from `retalk keys` (needed for a server on another machine)",
        subtype="FILE_PATH",
    )
    client_key_file: bpy.props.StringProperty(
        name="Client secret key",
        description="This machine's *.key_secret from `retalk keys`, allowed on the server",
        subtype="FILE_PATH",
    )
    timeout: bpy.props.FloatProperty(
        name="Timeout", description="Seconds to wait for the server's replies", default=10.0, min=1.0
    )
    codec: bpy.props.EnumProperty(
        name="Result codec",
        items=options.enum_items(options.JOB_OPTIONS["codec"].choices),
        default=options.JOB_OPTIONS["codec"].default,
    )

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "server")
        layout.prop(self, "server_key_file")
        layout.prop(self, "client_key_file")
        layout.prop(self, "timeout")
        layout.prop(self, "codec")
        row = layout.row()
        row.operator(RETALK_OT_start_local_server.bl_idname, icon="PLAY")
        if shutil.which("retalk") is None:
            row.label(text="retalk is not installed on this machine")


CLASSES = (RETALK_OT_start_local_server, RetalkPreferences)
