
app_name = "smtp"
urlpatterns: list = []
