"""URLs of the REST API under /api/v1/. The fixed routes come first: their names are reserved, not profiles."""

from django.urls import path

from orchestration import api_handler

urlpatterns = [
    path("", api_handler.ApiRootApi.as_view(), name="api-root"),
    path("config", api_handler.ConfigApi.as_view(), name="config"),
    path("llms", api_handler.LLMListApi.as_view(), name="llm-list"),
    path("metrics", api_handler.MetricsApi.as_view(), name="metrics"),
    path("tasks/", api_handler.TaskListApi.as_view(), name="task-list"),
    path("tasks", api_handler.TaskListNoSlashApi.as_view()),
    path("tasks/<str:task_id>", api_handler.TaskDetailApi.as_view(), name="task-detail"),
    path("tasks/<str:task_id>/cancel", api_handler.TaskCancelApi.as_view(), name="task-cancel"),
    path("tasks/<str:task_id>/feedback", api_handler.TaskFeedbackApi.as_view(), name="task-feedback"),
    path("tasks/<str:task_id>/events", api_handler.TaskEventsApi.as_view(), name="task-events"),
    path("<str:profile>/<str:role>", api_handler.TaskSubmitApi.as_view(), name="task-submit"),
]
