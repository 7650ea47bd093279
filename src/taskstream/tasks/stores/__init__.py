"""Result stores: task status and results by id (memory, SQLite, Redis). See :mod:`.base`."""

from taskstream.tasks.stores.base import FINAL_STATES, ResultStore, Status, TaskInfo, result_store_from_url
from taskstream.tasks.stores.memory import MemoryResultStore

__all__ = ["FINAL_STATES", "MemoryResultStore", "ResultStore", "Status", "TaskInfo", "result_store_from_url"]
