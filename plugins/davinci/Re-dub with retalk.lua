--[[
Re-dub with retalk: a DaVinci Resolve Edit-page menu entry (Workspace > Scripts > Edit), in Lua.

Re-dubs the selected video clip (or the one under the playhead) with replacement audio on a retalk server and
puts the result back on the same timeline item as a new take. Installed by `retalk resolve install`, which
writes RETALK_PYTHON below.

The same entry as `Re-dub with retalk.py`, making the same Resolve calls: it reads the shot and the audio clips
under it, hands them to retalk's bridge (`RETALK_PYTHON -m retalk.resolve_bridge REQUEST.json`; the messages are
written down in retalk's protocol/RESOLVE_BRIDGE.md), which shows the dialog, runs the job and words every
message, and then it places the result. Lua needs nothing installed: Resolve embeds it (LuaJIT, Lua 5.1), so this
entry also lists where Resolve lists no Python scripts (the free edition from 21.1). It calls only methods the
Resolve scripting README documents and checks every answer: Resolve reports failure with nil or false.
]]

local RETALK_PYTHON = nil -- written by `retalk resolve install`: the interpreter retalk is installed in

local BRIDGE_FORMAT = 1 -- the "bridge" field of a request
local BIN_NAME = "retalk"
local FINAL_EVENTS = { done = true, cancelled = true, closed = true, error = true, message = true }
local NOT_WIRED = "retalk is not wired to this script: run `retalk resolve install` in retalk's environment"
-- AppendToTimeline takes "trackIndex"/"recordFrame" in a clipInfo from the 2024-04 README (Resolve 19) on.
local PLACEMENT_MAJOR_VERSION = 19
local WINDOWS = package.config:sub(1, 1) == "\\"

-- An outcome for the editor, as a report the bridge words: a code and its fields (raised with error()).
local function failure(code, fields)
    local report = fields or {}
    report.code = code
    error({ report = report }, 0)
end

-- -- JSON, just what the bridge's messages need -----------------------------------------------------------
local json = {}

local function is_array(value)
    local count = 0
    for _ in pairs(value) do
        count = count + 1
    end
    return count == #value
end

function json.encode(value)
    local kind = type(value)
    if kind == "nil" then
        return "null"
    elseif kind == "boolean" then
        return tostring(value)
    elseif kind == "number" then
        if value == math.floor(value) and math.abs(value) < 2 ^ 53 then
            return string.format("%d", value)
        end
        return string.format("%.17g", value)
    elseif kind == "string" then
        return '"' .. value:gsub('[%c"\\]', function(char)
            return string.format("\\u%04x", char:byte())
        end) .. '"'
    elseif kind == "table" then
        local parts = {}
        if is_array(value) then -- an empty table is an empty list
            for index = 1, #value do
                parts[index] = json.encode(value[index])
            end
            return "[" .. table.concat(parts, ",") .. "]"
        end
        for key, item in pairs(value) do
            parts[#parts + 1] = json.encode(tostring(key)) .. ":" .. json.encode(item)
        end
        return "{" .. table.concat(parts, ",") .. "}"
    end
    error("cannot write a " .. kind .. " as JSON")
end

local function utf8_char(code)
    if code < 0x80 then
        return string.char(code)
    elseif code < 0x800 then
        return string.char(0xC0 + math.floor(code / 0x40), 0x80 + code % 0x40)
    elseif code < 0x10000 then
        return string.char(0xE0 + math.floor(code / 0x1000), 0x80 + math.floor(code / 0x40) % 0x40, 0x80 + code % 0x40)
    end
    return string.char(
        0xF0 + math.floor(code / 0x40000),
        0x80 + math.floor(code / 0x1000) % 0x40,
        0x80 + math.floor(code / 0x40) % 0x40,
        0x80 + code % 0x40
    )
end

local ESCAPES = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

-- One JSON value from `text` at `pos`: the value and the position after it; error() on anything else.
local function decode_at(text, pos)
    pos = text:find("%S", pos) or #text + 1
    local char = text:sub(pos, pos)
    if char == "{" or char == "[" then
        local result, closing = {}, (char == "{") and "}" or "]"
        pos = text:find("%S", pos + 1) or #text + 1
        if text:sub(pos, pos) == closing then
            return result, pos + 1
        end
        while true do
            local key, item
            if closing == "}" then
                key, pos = decode_at(text, pos)
                pos = text:find("%S", pos) or #text + 1
                if text:sub(pos, pos) ~= ":" then
                    error("expected ':' at " .. pos)
                end
                pos = pos + 1
            end
            item, pos = decode_at(text, pos)
            if closing == "}" then
                result[key] = item
            else
                result[#result + 1] = item
            end
            pos = text:find("%S", pos) or #text + 1
            local separator = text:sub(pos, pos)
            if separator == closing then
                return result, pos + 1
            elseif separator ~= "," then
                error("expected ',' or '" .. closing .. "' at " .. pos)
            end
            pos = pos + 1
        end
    elseif char == '"' then
        local parts, index = {}, pos + 1
        while true do
            local stop = text:find('["\\]', index)
            if not stop then
                error("unterminated string")
            end
            parts[#parts + 1] = text:sub(index, stop - 1)
            if text:sub(stop, stop) == '"' then
                return table.concat(parts), stop + 1
            end
            local escape = text:sub(stop + 1, stop + 1)
            if escape == "u" then
                local code = tonumber(text:sub(stop + 2, stop + 5), 16)
                index = stop + 6
                if code >= 0xD800 and code < 0xDC00 and text:sub(index, index + 1) == "\\u" then
                    local low = tonumber(text:sub(index + 2, index + 5), 16)
                    code = 0x10000 + (code - 0xD800) * 0x400 + (low - 0xDC00)
                    index = index + 6
                end
                parts[#parts + 1] = utf8_char(code)
            else
                parts[#parts + 1] = ESCAPES[escape] or escape
                index = stop + 2
            end
        end
    end
    local literal = text:match("^-?[%d.eE+-]+", pos)
    if literal then
        return tonumber(literal), pos + #literal
    end
    if text:sub(pos, pos + 3) == "true" then
        return true, pos + 4
    elseif text:sub(pos, pos + 4) == "false" then
        return false, pos + 5
    elseif text:sub(pos, pos + 3) == "null" then
        return nil, pos + 4
    end
    error("unexpected '" .. char .. "' at " .. pos)
end

function json.decode(text)
    return (decode_at(text, 1))
end

-- -- reading Resolve ------------------------------------------------------------------------------------------
-- A Resolve method, or nil where this version lacks it (e.g. GetSelectedClips before Resolve 21).
local function method(object, name)
    local ok, found = pcall(function()
        return object[name]
    end)
    if ok and found then
        return found
    end
    return nil
end

-- What a version-dependent reader answers, or nil where this version lacks it.
local function probe(object, name)
    local reader = method(object, name)
    if reader then
        return reader(object)
    end
    return nil
end

local function list(value)
    return value or {}
end

local function track_count(timeline, track_type)
    return tonumber(timeline:GetTrackCount(track_type)) or 0
end

local function same_item(a, b)
    return a == b or a:GetUniqueId() == b:GetUniqueId()
end

-- The video track index holding `item`, or nil.
local function video_track_of(timeline, item)
    for track = 1, track_count(timeline, "video") do
        local items = list(timeline:GetItemListInTrack("video", track))
        for index = 1, #items do
            if same_item(items[index], item) then
                return track
            end
        end
    end
    return nil
end

-- The clip to re-dub and its video track: the selected video clip (Resolve 21+), else the playhead's.
local function find_shot(timeline)
    local selected, on_video = list(probe(timeline, "GetSelectedClips")), {}
    for index = 1, #selected do
        local track = video_track_of(timeline, selected[index])
        if track then
            on_video[#on_video + 1] = { selected[index], track }
        end
    end
    if #on_video > 1 then
        failure("several-selected", { count = #on_video })
    end
    if #on_video == 1 then
        return on_video[1][1], on_video[1][2]
    end
    local item = timeline:GetCurrentVideoItem()
    local track = item and video_track_of(timeline, item)
    if not track then
        failure("no-clip")
    end
    return item, track
end

local function add_media_facts(facts, item)
    local media = item:GetMediaPoolItem()
    if media then
        facts.path = media:GetClipProperty("File Path") or ""
        facts.fps = media:GetClipProperty("FPS")
    end
    return facts
end

-- What the bridge needs to know about the timeline item (request field "shot").
local function shot_facts(project, item)
    return add_media_facts({
        clip = item:GetName(),
        timeline_fps = project:GetSetting("timelineFrameRate"),
        record_start = item:GetStart(),
        record_duration = item:GetDuration(),
        source_start = probe(item, "GetSourceStartFrame"), -- Resolve 19.1+
        source_end = probe(item, "GetSourceEndFrame"),
        left_offset = item:GetLeftOffset(),
        takes = item:GetTakesCount(),
    }, item)
end

-- The audio clips under the shot's first frame, one per track (request field "audio").
local function audio_facts(timeline, record_start)
    local found = {}
    for track = 1, track_count(timeline, "audio") do
        local items = list(timeline:GetItemListInTrack("audio", track))
        for index = 1, #items do
            local item = items[index]
            if record_start and item:GetStart() <= record_start and record_start < item:GetEnd() then
                found[#found + 1] = add_media_facts({
                    track = track,
                    track_name = timeline:GetTrackName("audio", track),
                    clip = item:GetName(),
                    record_start = item:GetStart(),
                    source_start = probe(item, "GetSourceStartFrame"),
                    left_offset = item:GetLeftOffset(),
                }, item)
                break
            end
        end
    end
    return found
end

local function host_facts(resolve)
    return { entry = "lua", product = resolve:GetProductName(), version = list(resolve:GetVersion()) }
end

-- The scene (the Resolve objects the result goes back into) and the bridge's re-dub request; failure() where
-- there is nothing to re-dub.
local function read_shot(resolve)
    local manager = resolve:GetProjectManager()
    local project = manager and manager:GetCurrentProject()
    if not project then
        failure("no-project")
    end
    local timeline = project:GetCurrentTimeline()
    if not timeline then
        failure("no-timeline")
    end
    local media_pool = project:GetMediaPool()
    if not media_pool then
        failure("no-media-pool")
    end
    local item, track = find_shot(timeline)
    local shot = shot_facts(project, item)
    local scene = { resolve = resolve, timeline = timeline, media_pool = media_pool, item = item, track = track }
    local request = {
        bridge = BRIDGE_FORMAT,
        kind = "redub",
        host = host_facts(resolve),
        shot = shot,
        audio = audio_facts(timeline, shot.record_start),
    }
    return scene, request
end

-- -- placing the result ---------------------------------------------------------------------------------------
-- The media pool's "retalk" bin, made under the root folder on first use.
local function retalk_bin(media_pool, path)
    local root = media_pool:GetRootFolder()
    if not root then
        failure("no-bin", { path = path })
    end
    local folders = list(root:GetSubFolderList())
    for index = 1, #folders do
        if folders[index]:GetName() == BIN_NAME then
            return folders[index]
        end
    end
    local folder = media_pool:AddSubFolder(root, BIN_NAME)
    if not folder then
        failure("no-bin", { path = path })
    end
    return folder
end

-- Import the result file into the retalk bin; returns its media pool item.
local function import_result(media_pool, path)
    local folder = retalk_bin(media_pool, path)
    local previous = media_pool:GetCurrentFolder()
    if not media_pool:SetCurrentFolder(folder) then
        failure("bin-not-opened", { path = path })
    end
    local items = list(media_pool:ImportMedia({ path }))
    if previous then
        media_pool:SetCurrentFolder(previous)
    end
    if #items == 0 then
        failure("import-failed", { path = path })
    end
    return items[1]
end

local function same_media(a, b)
    return a ~= nil and (a == b or a:GetMediaId() == b:GetMediaId())
end

-- Add `media` (frames 0..frames) as a take of `item` and select it; returns the take's index, or nil where
-- Resolve refuses the take.
local function add_as_take(item, media, frames)
    if not item:AddTake(media, 0, frames) then
        return nil
    end
    local index = tonumber(item:GetTakesCount()) or 0
    local take = index > 0 and item:GetTakeByIndex(index) or nil
    if not take or not same_media(take.mediaPoolItem, media) then
        failure("take-unlisted")
    end
    if not item:SelectTakeByIndex(index) then
        failure("take-not-selected", { take = index })
    end
    return index
end

-- Put `media` on the first free video track above the shot at its record frame; returns the track or nil.
local function place_above(scene, media, frames)
    local version = list(scene.resolve:GetVersion())
    if (tonumber(version[1]) or 0) < PLACEMENT_MAJOR_VERSION then
        return nil
    end
    local timeline, record_start, record_end = scene.timeline, scene.item:GetStart(), scene.item:GetEnd()
    local track = scene.track + 1
    while true do
        if track > track_count(timeline, "video") then
            if not timeline:AddTrack("video") then
                return nil
            end
            break
        end
        local busy, items = false, list(timeline:GetItemListInTrack("video", track))
        for index = 1, #items do
            if items[index]:GetStart() < record_end and items[index]:GetEnd() > record_start then
                busy = true
            end
        end
        if not busy then
            break
        end
        track = track + 1
    end
    local clip_info = {
        mediaPoolItem = media,
        startFrame = 0,
        endFrame = frames,
        trackIndex = track,
        recordFrame = record_start,
    }
    local placed = list(scene.media_pool:AppendToTimeline({ clip_info }))
    if #placed ~= 1 or placed[1]:GetStart() ~= record_start then
        if #placed > 0 then
            timeline:DeleteClips(placed)
        end
        return nil
    end
    return track
end

-- The result into the retalk bin, then as a take (or on the track above, or just in the bin): the report.
local function place(scene, done)
    local path, frames = done.path, tonumber(done.frames)
    local media = import_result(scene.media_pool, path)
    local clip = scene.item:GetName()
    local take = add_as_take(scene.item, media, frames)
    if take then
        return { code = "take", take = take, clip = clip }
    end
    local track = place_above(scene, media, frames)
    if track then
        return { code = "above", track = track, clip = clip }
    end
    return { code = "bin", file = path:match("[^/\\]+$") }
end

-- -- the bridge -----------------------------------------------------------------------------------------------
-- A line in Resolve's console (Workspace > Console).
local function say(text)
    print("retalk: " .. text)
end

local function quoted(word)
    if WINDOWS then
        return '"' .. word .. '"'
    end
    return "'" .. word:gsub("'", "'\\''") .. "'"
end

-- A new file for the request or the bridge's log. os.tmpname makes one on macOS and Linux; on Windows it names
-- a file in the drive's root, so the name there is made in %TEMP%.
local function temporary_path()
    if not WINDOWS then
        return os.tmpname()
    end
    local stamp = string.format("%d-%d-%d", os.time(), math.floor(os.clock() * 1e6), math.random(1, 1e9))
    return (os.getenv("TEMP") or os.getenv("TMP") or ".") .. "\\retalk-resolve-" .. stamp .. ".tmp"
end

local function file_exists(path)
    local file = path and io.open(path, "rb")
    if file then
        file:close()
    end
    return file ~= nil
end

local function last_line(path)
    local file, last = io.open(path, "rb"), ""
    if file then
        for line in file:lines() do
            if line:find("%S") then
                last = line
            end
        end
        file:close()
    end
    return last
end

-- Run the bridge on `request`, printing its status lines; returns its final event.
local function run_bridge(request)
    if not RETALK_PYTHON or not file_exists(RETALK_PYTHON) then
        return { event = "error", message = NOT_WIRED }
    end
    if not io.popen then
        return { event = "error", message = "this Resolve's Lua cannot start programs (no io.popen): use the Python entry" }
    end
    local request_path, log_path = temporary_path(), temporary_path()
    local out = io.open(request_path, "wb")
    if not out then
        return { event = "error", message = "could not write the request for retalk in " .. request_path }
    end
    out:write(json.encode(request))
    out:close()
    local command = table.concat({
        quoted(RETALK_PYTHON), "-m", "retalk.resolve_bridge", quoted(request_path), "2>" .. quoted(log_path),
    }, " ")
    if WINDOWS then -- cmd.exe drops the outer quotes of a command that starts with one
        command = '"' .. command .. '"'
    end
    local process, final = io.popen(command, "r"), nil
    if process then
        for line in process:lines() do
            local ok, event = pcall(json.decode, line)
            if ok and type(event) == "table" then
                if event.event == "status" then
                    say(tostring(event.text))
                elseif not final and FINAL_EVENTS[event.event] then
                    final = event
                end
            end
        end
        process:close()
    end
    if not final then
        final = { event = "error", message = "retalk stopped unexpectedly: " .. last_line(log_path) }
    end
    os.remove(request_path)
    os.remove(log_path)
    return final
end

-- Have the bridge word `outcome` (and show it in its window); print it in the console.
local function report(resolve, outcome)
    local final = run_bridge({ bridge = BRIDGE_FORMAT, kind = "report", host = host_facts(resolve), report = outcome })
    say(final.text or final.message or "")
end

-- Runs `action`; a failure() comes back as its report, anything else is raised again.
local function attempt(action, ...)
    local results = { pcall(action, ...) }
    if results[1] then
        return nil, unpack(results, 2)
    end
    if type(results[2]) == "table" and results[2].report then
        return results[2].report
    end
    error(results[2], 0)
end

-- Re-dub the shot and place the result; every outcome reaches the editor.
local function main(resolve)
    local failed, scene, request = attempt(read_shot, resolve)
    if failed then
        report(resolve, failed)
        return
    end
    local final = run_bridge(request)
    if final.event == "done" then
        local place_failed, outcome = attempt(place, scene, final)
        outcome = place_failed or outcome
        outcome.warnings = final.warnings or {}
        report(resolve, outcome)
    elseif final.message then -- error or cancelled; "closed" (the editor closed the dialog) needs no words
        say(final.message)
    end
end

if ... == "retalk-module" then -- loaded as a library (the tests), not run from the menu
    return { main = main, read_shot = read_shot, json = json }
end
main(resolve or bmd.scriptapp("Resolve"))
