
app_name = "mailsecurity"
urlpatterns: list = []
