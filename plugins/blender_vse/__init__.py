"""retalk for Blender's Video Sequence Editor: re-dub the selected movie strip with replacement audio.

Right-click a movie strip (or Strip menu) > "Re-dub with audio…". The job runs on a retalk server
(`retalk serve`, set in the add-on's preferences); the result comes back as a new take on the channel above.
"""

import bpy

from . import operators, preferences

_CLASSES = preferences.CLASSES + operators.CLASSES


def register():
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    for menu in operators.MENUS:
        menu.append(operators.draw_menu)


def unregister():
    for menu in operators.MENUS:
        menu.remove(operators.draw_menu)
    for task in operators.background_tasks:
        task.cancel()
    operators.background_tasks.clear()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
