from app.dashboard.main import main

main()
