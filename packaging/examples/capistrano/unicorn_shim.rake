# Capistrano 3: publish a release one server at a time through unicorn-shim.
#
# Load it from the Capfile, after `require "capistrano/deploy"`:
#   import "/usr/share/doc/unicorn-shim/examples/capistrano/unicorn_shim.rake"
# (or copy it to lib/capistrano/tasks/, which the default Capfile imports).
#
# It replaces deploy:symlink:release, which points current at the new release
# on every server at once: here each server in turn gets current pointed at
# the release and the app reloaded with `unicorn-shim reload APP`, which
# returns only once the new release serves. The first server whose reload
# fails gets current pointed back at the release that serves, and the deploy
# stops there with the shim's reason; the servers after it are not touched.
# `cap STAGE deploy:rollback` goes through the same steps.
#
# Settings:
#   :unicorn_shim_app      the app's name in /etc/unicorn-shim/APP.conf (default: :application)
#   :unicorn_shim_roles    the roles that run the app (default: :app)
#   :unicorn_shim_reload   the reload command, an array (default: unicorn-shim reload APP;
#                          a deploy user without root: %w[sudo -n -u APP_USER unicorn-shim reload APP],
#                          see the packaged sudoers-deploy example)
#   :unicorn_shim_flip_back  point current back after a failed reload (default: true)

namespace :unicorn_shim do
  desc "Point current at the release and reload through unicorn-shim, one server at a time"
  task :publish do
    app = fetch(:unicorn_shim_app) { fetch(:application) }
    reload = fetch(:unicorn_shim_reload) { ["unicorn-shim", "reload", app] }
    flip_back = fetch(:unicorn_shim_flip_back, true)
    on roles(fetch(:unicorn_shim_roles, :app)), in: :sequence do |server|
      previous = capture(:readlink, "-e", current_path, raise_on_non_zero_exit: false)
      next_link = release_path.parent.join(current_path.basename)
      execute :ln, "-sfn", release_path, next_link
      execute :mv, "-T", next_link, current_path          # a rename: current is never missing
      begin
        execute(*reload)
        info "unicorn-shim: #{app} on #{server} serves #{release_path}"
      rescue SSHKit::Command::Failed => e
        shim_says = e.message[/ stderr: (.*)\z/m, 1].to_s.strip
        if flip_back && !previous.empty?
          execute :ln, "-sfn", previous, next_link
          execute :mv, "-T", next_link, current_path
          where = "current points back at #{previous}"
        else
          where = "current still names #{release_path}"
        end
        error "unicorn-shim: reload of #{app} failed on #{server}: #{shim_says}"
        raise "unicorn-shim: reload of #{app} failed on #{server} (#{where}); " \
              "the servers after it were not touched: #{shim_says}"
      end
    end
  end
end

Rake::Task["deploy:symlink:release"].clear_actions
namespace :deploy do
  namespace :symlink do
    task :release do
      invoke "unicorn_shim:publish"
    end
  end
end
